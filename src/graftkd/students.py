"""Which zoo students fit a teacher, and the one resolver that picks a student for ``--student-arch auto[:Nx]``.

A student "fits" when it takes the teacher's input, predicts the same classes, is smaller than the teacher,
and the default path can take it: it is "derivable" (:mod:`graftkd.derive` builds the whole network, or some of
its blocks, from the teacher's own weights; patient KD trains the rest), or else it pairs with the teacher block
by block (the grafting plan accepts it). The other smaller models are "fresh only": a registered method trains
them from fresh weights.
"""
from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from graftkd.errors import GraftkdError

AUTO = re.compile(r"^auto(?::(\d+(?:\.\d+)?)x)?$")
DEFAULT_COMPRESSION = 3.0  # auto without a target: about a third of the teacher's parameters


@dataclass
class Fit:
    arch: str
    params: int
    flops: int
    compression: float  # teacher params / student params
    derivable: str  # "whole", "partly (blocks 1,3 of 3, the others fresh)", "no", or "fresh only" (not graftable)
    why: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def fitting_students(teacher: nn.Module, teacher_arch: str, input_shape: tuple[int, ...], num_classes: int,
                     fresh_only: bool = False) -> list[Fit]:
    """Every zoo model that fits ``teacher`` (see the module doc), smallest first. ``fresh_only``: also the smaller
    models that do not pair with it block by block (another family), as ``derivable="fresh only"``: a fresh
    student that a registered method trains (``--method kd --recipe patient``), never the default path's."""
    from graftkd.derive import Underivable, derive_student
    from graftkd.graft.plan import build_plan
    from graftkd.models import build_model, list_models
    from graftkd.models.profile import count_flops, count_params

    teacher = teacher.eval()
    t_params = count_params(teacher)
    fits = []
    for arch in list_models():
        if arch in ("hybrid", teacher_arch):
            continue
        try:
            student = build_model(arch, num_classes=num_classes)
        except (GraftkdError, TypeError, ValueError):
            continue
        if tuple(getattr(student, "input_shape", input_shape)) != tuple(input_shape):
            continue
        params = count_params(student)
        if params >= t_params:
            continue
        try:
            record = derive_student(teacher, student, tuple(input_shape))  # reads the teacher, fills the student
            blocks = len(record.blocks)
            fresh = record.fresh_blocks
            kept = [str(i + 1) for i in range(blocks) if i not in fresh]
            derivable = ("whole" if record.whole else "no" if not kept else
                         f"partly (block{'s' if len(kept) > 1 else ''} {','.join(kept)} of {blocks}, the others fresh)")
            why = record.fallback_reason or ""
        except (Underivable, GraftkdError, RuntimeError) as exc:  # another family may fail anywhere in the walk
            derivable, why = "no", " ".join(str(exc).split())
        if derivable == "no":  # the default path then grafts it: that needs the grafting plan
            try:
                build_plan(copy.deepcopy(teacher), copy.deepcopy(student), tuple(input_shape), inherit="none")
            except (GraftkdError, RuntimeError) as exc:
                if not fresh_only:
                    continue
                derivable, why = "fresh only", f"no block-by-block pairing ({' '.join(str(exc).split())[:100]})"
        with torch.no_grad():
            flops = count_flops(student, tuple(input_shape))
        fits.append(Fit(arch, params, flops, t_params / params, derivable, why))
    return sorted(fits, key=lambda f: f.params)


def compression_target(spec: str) -> float | None:
    """N of ``auto[:Nx]`` (3 for plain ``auto``), None for a model name; a bad target is an error."""
    text = spec.strip().lower()
    if not text.startswith("auto"):
        return None
    match = AUTO.match(text)
    if match is None:
        raise GraftkdError(f"--student-arch {spec}: write auto or auto:Nx with N a number, e.g. auto:3x")
    target = float(match.group(1)) if match.group(1) else DEFAULT_COMPRESSION
    if target <= 1:
        raise GraftkdError(f"--student-arch {spec}: the compression target must be above 1x (e.g. auto:3x)")
    return target


def resolve_student(spec: str, teacher: nn.Module, teacher_arch: str, input_shape: tuple[int, ...],
                    num_classes: int) -> tuple[str, str | None]:
    """``--student-arch``: a model name is kept as it is; ``auto`` or ``auto:Nx`` picks the fitting student
    whose compression is closest to N (3 when not given), derivable whole first, then derivable in part.
    Returns the architecture and why it was chosen (None when the user named it)."""
    target = compression_target(spec)
    if target is None:
        return spec, None
    fits = fitting_students(teacher, teacher_arch, input_shape, num_classes)
    if not fits:
        raise GraftkdError(f"no zoo student fits the teacher {teacher_arch}: name one with --student-arch "
                           "(`graftkd models` lists them)")
    rank = {"whole": 0, "no": 2}
    import math

    best = min(fits, key=lambda f: (rank.get(f.derivable, 1), abs(math.log(f.compression / target))))
    why = (f"--student-arch {spec}: of {len(fits)} zoo students that fit {teacher_arch}, {best.arch} "
           f"({best.compression:.1f}x fewer parameters, derivable: {best.derivable}) is the closest to {target:g}x "
           "among the most derivable")
    return best.arch, why
