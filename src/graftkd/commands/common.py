"""What several commands share: the common options, the ``--out`` check, a zoo model's input options."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from graftkd.errors import GraftkdError


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the run (few-shot draw, initialisation, batches)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_teacher(p: argparse.ArgumentParser, *, required: bool = True,
                help: str = "a registered teacher name (`graftkd teachers list`) or a weights file") -> None:
    """The teacher: a registry name or a file, the file's architecture, and where registered files are."""
    p.add_argument("--teacher", required=required, help=help)
    p.add_argument("--teacher-arch", help="zoo architecture of a teacher weights file, e.g. resnet56")
    p.add_argument("--teachers-dir", help="folder holding registered teacher files (also: GRAFTKD_TEACHERS)")


def check_out_dir(out: str | None) -> None:
    """Refuse an ``--out`` that cannot become a directory before any work starts (not at the first save)."""
    if not out:
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise GraftkdError(f"--out {out} is a file, not a directory: choose another --out")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise GraftkdError(f"--out {out} is below {parent}, which is a file: choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GraftkdError(f"--out {out}: {parent} is not writable: choose another --out")


def input_kwargs(arch: str, channels: int) -> dict:
    """``build_model`` options for images with ``channels`` channels (the digits models take 1 by design)."""
    return {} if channels == 3 or arch.startswith("digits") else {"in_channels": channels}
