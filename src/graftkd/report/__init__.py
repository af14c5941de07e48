"""Tables and figures from bench results (``graftkd report results/<grid>``); reads result files only."""
from __future__ import annotations

from graftkd.report.plots import plot_accuracy_vs_shots, plot_curves
from graftkd.report.tables import collect, load_grid, render_markdown, summarize, write_report

__all__ = ["collect", "load_grid", "plot_accuracy_vs_shots", "plot_curves", "render_markdown", "summarize",
           "write_report"]
