"""Tables and figures from bench results (``graftkd report results/<grid>``); reads result files only."""
from __future__ import annotations

from graftkd.report.plots import plot_accuracy_vs_shots, plot_curves
from graftkd.report.tables import collect, load_grid, render_markdown, summarize, write_report

__all__ = ["collect", "load_grid", "plot_accuracy_vs_shots", "plot_curves", "render_markdown", "summarize",
           "write_any_report", "write_report"]


def write_any_report(folder) -> dict:
    """The report a results folder calls for, read from what it holds (one place decides): a full-data grid
    (its ``grid.json`` says so), a few-shot grid (cell files), or a folder of standalone ``distill`` runs."""
    import json
    from pathlib import Path

    from graftkd.report.runs import distill_runs, write_runs_report

    folder = Path(folder)
    grid = folder / "grid.json"
    from graftkd.report.fulldata import GRID_KIND

    if grid.is_file() and json.loads(grid.read_text()).get("kind") == GRID_KIND:
        from graftkd.report.fulldata import write_full_report

        return write_full_report(folder)
    if not any((folder / "cells").glob("*.json")) and distill_runs(folder):
        return write_runs_report(folder)
    return write_report(folder)
