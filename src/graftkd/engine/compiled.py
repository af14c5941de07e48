"""torch.compile (inductor) for the loop's plain step: when it pays, and a fallback when it cannot run.

Measured on the 2-core CPU (``benchmarks/kd_speed.py --compile``, ResNet-56 -> ResNet-20, batch 64, fp32
channels_last): 165 against 133 img/s eager (1.24x), after 84 s of compilation, so it pays back after about
900 steps. ``auto`` therefore compiles a run of at least ``AUTO_MIN_STEPS`` steps (twice that, for margin on
other machines and models) and nothing shorter. Only the loop's own teacher-then-student step is compiled:
methods with feature hooks, their own step or the disagreement probe stay eager, as does a batch of another
size (the budget's remainder), which would otherwise compile a second graph. Compiled kernels round
differently from eager ones, so a compiled run is reproducible against compiled runs, not eager ones.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

MODES = ("off", "on", "auto")
AUTO_MIN_STEPS = 2_000


class CompiledPair:
    """Compiled teacher and student forwards for batches of one size; anything else runs eagerly."""

    def __init__(self, teacher: nn.Module, student: nn.Module, batch_size: int) -> None:
        self.eager = (teacher, student)
        self.compiled = (torch.compile(teacher), torch.compile(student))
        self.batch_size = batch_size
        self.failed: str | None = None

    def _pick(self, x: torch.Tensor, which: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.compiled[which] if self.failed is None and len(x) == self.batch_size else self.eager[which]

    def teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(x, 0)

    def student(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(x, 1)

    def _call(self, x: torch.Tensor, which: int) -> torch.Tensor:
        forward = self._pick(x, which)
        if forward is self.eager[which]:
            return forward(x)
        try:
            return forward(x)
        except Exception as exc:  # no C++ compiler, an unsupported op, ...: train on, eagerly, and say so
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            tqdm.write(f"torch.compile failed ({self.failed}); training on without it")
            return self.eager[which](x)


def decide(mode: str, steps: int, *, plain_step: bool, device: torch.device) -> dict:
    """Whether to compile, and why (for result.json)."""
    if mode not in MODES:
        raise ValueError(f"unknown compile mode '{mode}': use one of {', '.join(MODES)}")
    if mode == "off":
        return {"requested": mode, "used": False, "why": "off"}
    if not plain_step:
        return {"requested": mode, "used": False,
                "why": "the method's step has feature hooks, its own passes or a probe: eager"}
    if mode == "auto" and steps < AUTO_MIN_STEPS:
        return {"requested": mode, "used": False,
                "why": f"{steps} steps < {AUTO_MIN_STEPS}: compiling would not pay back"}
    why = "on" if mode == "on" else f"{steps} steps >= {AUTO_MIN_STEPS}: compiling pays back"
    return {"requested": mode, "used": True, "why": why, "device": device.type}
