"""`graftkd students`: the zoo students that fit a teacher, and whether they can be derived from it."""
from __future__ import annotations

import argparse

from graftkd.commands.common import add_teacher
from graftkd.loaded import load_teacher, num_outputs


NAME = "students"
HELP = "list the zoo students that fit a teacher, and whether they can be derived"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_teacher(p)
    p.add_argument("--num-classes", type=int, help="classes of a teacher weights file")


def run(args) -> None:
    from graftkd.models.profile import format_count
    from graftkd.students import fitting_students

    teacher = load_teacher(args.teacher, args.teacher_arch, args.num_classes, args.teachers_dir)
    shape = tuple(getattr(teacher.model, "input_shape", (3, 32, 32)))
    every = fitting_students(teacher.model, teacher.arch, shape, num_outputs(teacher.model, shape), fresh_only=True)
    fits = [f for f in every if f.derivable != "fresh only"]
    others = [f for f in every if f.derivable == "fresh only"]

    def row(f) -> str:
        why = "" if f.derivable == "whole" or not f.why else f" ({f.why})" if f.derivable == "no" else f": {f.why}"
        return (f"{f.arch:<16} {format_count(f.params):>8} {format_count(f.flops):>8} {f.compression:>7.1f}x  "
                f"{f.derivable}{why}")

    print(f"students that fit {teacher.source} ({teacher.arch}), smallest first:")
    print(f"{'model':<16} {'params':>8} {'FLOPs':>8} {'smaller':>8}  derivable from the teacher")
    for f in fits:
        print(row(f))
    if not fits:
        print("none: name a student with --student-arch (`graftkd models` lists the zoo)")
    if others:
        print("\nsmaller zoo models of another block layout: no derivation or grafting, a fresh student trained by a "
              "method\n(`graftkd distill --method kd --recipe patient --student-arch NAME`):")
        for f in others:
            print(f"{f.arch:<16} {format_count(f.params):>8} {format_count(f.flops):>8} {f.compression:>7.1f}x")
