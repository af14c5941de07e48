"""Checkpoints that survive kills: atomic writes, weights-only loading, a fingerprint of the config.

A run directory holds one ``checkpoint.pt``. Re-running the same command finds it and resumes; a
checkpoint made by a different configuration is refused rather than silently mixed in. Each checkpoint also
carries the seconds its run had spent since training started, summed over the processes that resumed it, so a
resumed run can say what it cost in all (the time between a process's last save and its end is lost work,
not counted).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from graftkd.files import atomic_torch_save, safe_torch_load
from graftkd.errors import GraftkdError

CHECKPOINT_NAME = "checkpoint.pt"


def fingerprint(config: Any) -> str:
    """A short stable hash of a JSON-able configuration."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Checkpointer:
    """Saves and finds the resumable state of one run directory."""

    def __init__(self, run_dir: str | Path | None, config_fingerprint: str, kind: str) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.fingerprint = config_fingerprint
        self.kind = kind
        self._clock = time.perf_counter()
        # seconds earlier processes of this run spent up to their last save: 0 for a new run, None when the
        # checkpoint resumed predates the count
        self.seconds_before: float | None = 0.0

    def seconds(self) -> float | None:
        """This run's training seconds so far, earlier processes included (None when they are unknown)."""
        if self.seconds_before is None:
            return None
        return self.seconds_before + time.perf_counter() - self._clock

    @property
    def path(self) -> Path | None:
        return self.run_dir / CHECKPOINT_NAME if self.run_dir is not None else None

    def last_good(self) -> str:
        """For error messages: the checkpoint a re-run would resume from, or why there is none."""
        if self.path is None:
            return "none (no run directory was given)"
        return str(self.path) if self.path.is_file() else f"none written yet (it would be {self.path})"

    def save(self, state: dict) -> None:
        if self.path is None:
            return
        # the count goes last: a state carried over from a loaded checkpoint must not bring back its old count
        atomic_torch_save(self.path, {"kind": self.kind, "fingerprint": self.fingerprint, **state,
                                      "seconds": self.seconds()})

    def load(self) -> dict | None:
        """The saved state, or None when there is nothing to resume. Training time counts from this call."""
        self._clock = time.perf_counter()
        if self.path is None or not self.path.is_file():
            return None
        state = safe_torch_load(self.path)
        if not isinstance(state, dict) or state.get("kind") != self.kind:
            raise GraftkdError(f"{self.path} is not a {self.kind} checkpoint: choose another --out directory")
        if state.get("fingerprint") != self.fingerprint:
            raise GraftkdError(
                f"{self.path} was written by a run with different settings: resume with the same command, "
                "or choose a new --out directory (or delete the checkpoint to start over)"
            )
        seconds = state.get("seconds")
        self.seconds_before = float(seconds) if isinstance(seconds, (int, float)) else None
        return state

    def remove(self) -> None:
        if self.path is not None and self.path.is_file():
            self.path.unlink()
