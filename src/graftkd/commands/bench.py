"""`graftkd bench`: run or finish an experiment grid."""
from __future__ import annotations

import argparse

from graftkd.errors import GraftkdError


NAME = "bench"
HELP = "run (or finish) an experiment grid: methods x shots x seeds x subsets"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="grid YAML, e.g. configs/digits.yaml")
    p.add_argument("--out", default="results", help="results root: cells go to <out>/<grid name>/cells/")
    p.add_argument("--runs", default="runs/bench", help="checkpoints of unfinished cells (resumable)")
    p.add_argument("--methods", help="comma-separated subset of the grid's methods to run now")
    p.add_argument("--shots", help="comma-separated subset of the grid's K values to run now")
    p.add_argument("--seeds", help="comma-separated subset of the grid's seeds to run now")
    p.add_argument("--curves-only", action="store_true",
                   help="run only the grid's Figure 3 curve cells (train/test accuracy every curves.eval_every epochs)")
    p.add_argument("--no-report", action="store_true", help="do not regenerate results.md/json and plots")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells to run at once, each in its own process with the grid's thread count (default 1)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args) -> None:
    from graftkd.bench import run_grid

    only = [m.strip() for m in args.methods.split(",")] if args.methods else None
    shots = [int(k) for k in args.shots.split(",")] if args.shots else None
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    summary = run_grid(args.config, args.out, args.runs, args.device, not args.no_progress, only, shots, seeds,
                       args.curves_only, args.jobs)
    print(f"{summary['cells']} cells: {summary['ok']} ran, {summary['skipped']} already done, "
          f"{summary['unsupported']} unsupported, {summary['failed']} failed; results in {summary['out']}")
    if not args.no_report:
        from graftkd.report import write_any_report

        print(f"report: {write_any_report(summary['out'])['markdown']}")
    if summary["failed"]:
        raise GraftkdError(f"{summary['failed']} cell(s) failed (see their result files); re-run to retry them")
