"""``graftkd bench``: experiment grids, one result file per cell, resumable.

Two kinds of grid, told apart by the config's ``kind`` key in one place (:data:`RUNNERS`):
few-shot grids (no ``kind``; :mod:`graftkd.bench.fewshot`) and full-data grids (``kind: fulldata``;
:mod:`graftkd.bench.fulldata`).
"""
from __future__ import annotations

from pathlib import Path

from graftkd.bench.cells import finished, read_yaml
from graftkd.bench.fewshot import (Cell, CurveSpec, GridConfig, GridRunner, TeacherSpec, build_row_method,
                                   grid_cells, load_grid, run_fewshot_grid)
from graftkd.errors import GraftkdError

__all__ = ["Cell", "CurveSpec", "GridConfig", "GridRunner", "TeacherSpec", "build_row_method", "finished",
           "grid_cells", "load_grid", "run_grid"]

FULLDATA = "fulldata"  # a config's ``kind`` for pairs x distillers x modes on the full training set


def _run_fulldata(raw: dict, config_path: str, out_root, runs_root, device: str, progress: bool, **slice_) -> dict:
    from graftkd.bench.fulldata import FullGridConfig, run_full_grid

    jobs = slice_.pop("jobs")
    if any(slice_.values()) or jobs > 1:
        raise GraftkdError("--methods/--shots/--seeds/--curves-only/--jobs are for few-shot grids; a full-data "
                           "grid runs whole, one cell at a time")
    return run_full_grid(FullGridConfig.from_dict(raw, config_path), config_path, out_root, runs_root, device,
                         progress)


def _run_fewshot(raw: dict, config_path: str, out_root, runs_root, device: str, progress: bool, **slice_) -> dict:
    return run_fewshot_grid(GridConfig.from_dict(raw, config_path), config_path, out_root, runs_root, device,
                            progress, **slice_)


RUNNERS = {None: _run_fewshot, FULLDATA: _run_fulldata}


def run_grid(config_path: str | Path, out_root: str | Path = "results", runs_root: str | Path = "runs/bench",
             device: str = "auto", progress: bool = True, only: list[str] | None = None,
             shots: list[int] | None = None, seeds: list[int] | None = None, curves_only: bool = False,
             jobs: int = 1) -> dict:
    """Run (or finish) every cell of the grid in ``config_path`` (or a slice of it: ``only`` methods, ``shots``,
    ``seeds``, ``curves_only``; ``jobs`` cells at once), with the runner its ``kind`` names."""
    raw = read_yaml(Path(config_path))
    kind = raw.get("kind") if isinstance(raw, dict) else None
    if kind not in RUNNERS:
        raise GraftkdError(f"{config_path}: unknown grid kind {kind!r}; leave it out for a few-shot grid, or "
                           f"kind: {FULLDATA}")
    return RUNNERS[kind](raw, str(config_path), out_root, runs_root, device, progress, only=only, shots=shots,
                         seeds=seeds, curves_only=curves_only, jobs=jobs)
