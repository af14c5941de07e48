"""`graftkd teachers`: the teacher registry."""
from __future__ import annotations

import argparse

from graftkd.loaded import teacher_status


NAME = "teachers"
HELP = "the teacher registry"


def add_arguments(p: argparse.ArgumentParser) -> None:
    tsub = p.add_subparsers(dest="teachers_command", required=True)
    q = tsub.add_parser("list", help="registered teachers, their accuracy and whether their file is here")
    q.add_argument("--teachers-dir", help="folder holding teacher files (also: GRAFTKD_TEACHERS)")


def run(args) -> None:
    from graftkd.models.teacher_registry import load_registry, teacher_dirs

    registry = load_registry()
    print(f"{'name':<18} {'arch':<10} {'data':<9} {'acc %':>6} {'ref %':>6}  file")
    for entry in registry:
        acc = f"{entry.accuracy:.2f}" if entry.accuracy is not None else "-"
        ref = f"{entry.reference_accuracy:.2f}" if entry.reference_accuracy is not None else "-"
        print(f"{entry.name:<18} {entry.arch:<10} {entry.dataset:<9} {acc:>6} {ref:>6}  "
              f"{entry.file} [{teacher_status(entry, args.teachers_dir)}]")
    print("searched: " + ", ".join(str(d) for d in teacher_dirs(args.teachers_dir)))
