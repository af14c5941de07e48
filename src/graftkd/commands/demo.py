"""`graftkd demo`: graft a digits CNN from 1 and 5 unlabeled images per class, no download."""
from __future__ import annotations

import argparse

from graftkd.commands.common import add_common


NAME = "demo"
HELP = "graft a digits CNN from 1 and 5 unlabeled images per class (no download)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="folder for the demo's runs and its summary (default: runs/demo)")
    add_common(p)


def run(args) -> None:
    from graftkd.demo import run_demo

    run_demo(args.out, device=args.device, seed=args.seed, progress=not args.no_progress)
