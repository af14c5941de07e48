"""`graftkd report`: tables and plots from a grid's cell files or a folder of distill runs."""
from __future__ import annotations

import argparse


NAME = "report"
HELP = "tables (Markdown, JSON) and plots from a grid's result files or a folder of distill runs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results_dir", help="results/<grid name>, or any folder of `graftkd distill` runs")


def run(args) -> None:
    from graftkd.report import write_any_report

    written = write_any_report(args.results_dir)
    print(f"wrote {written['markdown']}, {written['json']}" + "".join(f", {p}" for p in written["plots"] if p))
