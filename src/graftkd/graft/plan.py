"""GraftPlan: teacher blocks, student blocks, adapters, inheritance and fold targets, checked at set-up.

Everything that can be wrong about a teacher/student pair (block counts, spatial sizes at a cut,
class counts, a cut whose adapters could not be folded) is found here, before any training, with a
message that names the block, both shapes and what to change.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from graftkd.errors import GraftkdError
from graftkd.graft.adapters import ChannelAdapter, Scion
from graftkd.graft.blocks import (
    BlockList,
    BoundaryShape,
    block_names,
    resolve_blocks,
    same_architecture,
    trace_boundaries,
)
from graftkd.graft.merge import FoldTarget, find_fold_targets, fold_into

InheritSpec = Literal["auto", "none"] | Sequence[int] | Sequence[str]


@dataclass
class GraftPlan:
    """The resolved pairing of a frozen teacher and a student, block by block."""

    teacher: nn.Module
    student: nn.Module
    teacher_blocks: list[nn.Module]
    student_blocks: list[nn.Module]
    names: list[str]
    teacher_out: list[BoundaryShape]
    student_out: list[BoundaryShape]
    input_shape: tuple[int, ...]
    scions: nn.ModuleList
    inherited: list[int] = field(default_factory=list)
    inherit_trainable: bool = False
    fold_targets: dict[int, list[FoldTarget]] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return len(self.teacher_blocks)

    @property
    def adapter_cuts(self) -> list[int]:
        """Indices l (0-based) of the cuts after block l where teacher and student widths differ."""
        return sorted(self.fold_targets)

    def grafted_blocks(self) -> list[int]:
        """Blocks that are replaced by a scion when the whole student is grafted."""
        return [i for i in range(self.num_blocks) if i not in self.inherited or self.inherit_trainable]

    def block_stage_blocks(self) -> list[int]:
        """Blocks trained alone in stage 1: inherited blocks already equal their teacher block."""
        return [i for i in range(self.num_blocks) if i not in self.inherited]

    def describe(self) -> list[dict]:
        """One row per block for reports: names, shapes, adapters, inheritance."""
        rows = []
        for i, name in enumerate(self.names):
            scion = self.scions[i]
            rows.append(
                {
                    "block": i + 1,
                    "name": name,
                    "teacher_out": str(self.teacher_out[i]),
                    "student_out": str(self.student_out[i]),
                    "adapter_in": _adapter_repr(scion.adapter_in),
                    "adapter_out": _adapter_repr(scion.adapter_out),
                    "inherited": (
                        ("trainable" if self.inherit_trainable else "frozen") if i in self.inherited else "no"
                    ),
                    "teacher_params": _count(self.teacher_blocks[i]),
                    "student_params": _count(self.student_blocks[i]),
                }
            )
        return rows

    def grafted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """T_L^N: every grafted block replaced by its scion (inherited frozen blocks stay teacher blocks)."""
        replaced = set(self.grafted_blocks())
        for i in range(self.num_blocks):
            x = self.scions[i](x) if i in replaced else self.teacher_blocks[i](x)
        return x

    @torch.no_grad()
    def merge(self, probe: torch.Tensor | None = None, atol: float = 1e-4) -> float:
        """Fold adapters into the student (Eq. 6) and return max |Δlogit| vs the grafted chain on ``probe``.

        The student modules are modified in place; afterwards ``self.student`` is the plain student.
        """
        student_mode = self.student.training
        self.student.eval()
        self.scions.eval()
        # Inherited frozen blocks ran as teacher blocks; the student holds the same copied weights.
        reference = self.grafted_forward(probe) if probe is not None else None
        for cut, targets in self.fold_targets.items():
            matrix = self.scions[cut + 1].adapter_in.matrix @ self.scions[cut].adapter_out.matrix
            fold_into(self.student_blocks[cut + 1], targets, matrix)
        for scion in self.scions:
            for name in ("adapter_in", "adapter_out"):
                if isinstance(getattr(scion, name), ChannelAdapter):
                    setattr(scion, name, nn.Identity())
        self.fold_targets = {}
        difference = 0.0
        if probe is not None:
            merged = self.student(probe)
            difference = float((merged - reference).abs().max())
            if not difference <= atol:
                raise GraftkdError(
                    f"the merged student differs from the grafted chain by {difference:.2e} (> {atol:g}); "
                    "this is a bug in the fold, please report it with your block list"
                )
        self.student.train(student_mode)
        return difference


def _adapter_repr(module: nn.Module) -> str:
    return f"{module.in_channels}->{module.out_channels}" if isinstance(module, ChannelAdapter) else "-"


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _resolve_inherit(spec: InheritSpec, names: list[str], identical: list[bool]) -> list[int]:
    if isinstance(spec, str):
        if spec == "auto":
            return [i for i, same in enumerate(identical) if same]
        if spec == "none":
            return []
        spec = [part for part in spec.split(",") if part.strip()]
    chosen: list[int] = []
    for item in spec:
        if isinstance(item, int) or (isinstance(item, str) and item.strip().isdigit()):
            index = int(item) - 1  # users count blocks from 1, as the paper does
        elif item in names:
            index = names.index(item)
        else:
            raise GraftkdError(f"cannot inherit block {item!r}: blocks are 1..{len(names)} or names {names}")
        if not 0 <= index < len(names):
            raise GraftkdError(f"cannot inherit block {item!r}: blocks are numbered 1..{len(names)}")
        if not identical[index]:
            raise GraftkdError(
                f"cannot inherit block {index + 1} ('{names[index]}'): teacher and student blocks differ in "
                "architecture, so teacher weights do not fit; remove it from --inherit"
            )
        chosen.append(index)
    return sorted(set(chosen))


def build_plan(
    teacher: nn.Module,
    student: nn.Module,
    input_shape: Sequence[int],
    *,
    teacher_blocks: BlockList = None,
    student_blocks: BlockList = None,
    inherit: InheritSpec = "auto",
    inherit_trainable: bool = False,
) -> GraftPlan:
    """Pair teacher and student block by block, check every cut, build adapters and inherit blocks."""
    input_shape = tuple(int(s) for s in input_shape)
    t_blocks = resolve_blocks(teacher, teacher_blocks, role="teacher")
    s_blocks = resolve_blocks(student, student_blocks, role="student")
    if len(t_blocks) != len(s_blocks):
        raise GraftkdError(
            f"teacher has {len(t_blocks)} blocks but student has {len(s_blocks)}: grafting pairs block l of the "
            "student with block l of the teacher, so give both the same number of blocks"
        )
    names = block_names(teacher, teacher_blocks, len(t_blocks))
    device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    sample = torch.zeros((2, *input_shape), device=device)
    t_out = trace_boundaries(teacher, t_blocks, sample, role="teacher")
    s_out = trace_boundaries(student, s_blocks, sample.to(next(student.parameters()).device), role="student")

    for i, (t_shape, s_shape) in enumerate(zip(t_out, s_out)):
        if t_shape.spatial != s_shape.spatial or len(t_shape.shape) != len(s_shape.shape):
            raise GraftkdError(
                f"block {i + 1} ('{names[i]}') outputs {t_shape} in the teacher but {s_shape} in the student: "
                "spatial sizes must match at every cut (channels may differ); change the student's strides "
                "or pooling in this block, or move the cut"
            )
    if t_out[-1] != s_out[-1]:
        raise GraftkdError(
            f"the teacher predicts {t_out[-1].channels} classes but the student {s_out[-1].channels}: "
            f"build the student with num_classes={t_out[-1].channels}"
        )

    identical = [same_architecture(t, s) for t, s in zip(t_blocks, s_blocks)]
    inherited = _resolve_inherit(inherit, names, identical)
    for i in inherited:
        s_blocks[i].load_state_dict(t_blocks[i].state_dict())
        for p in s_blocks[i].parameters():
            p.requires_grad_(inherit_trainable)

    # Adapters at every cut where widths differ (Eq. 2), none on the input or the logits (Eq. 3).
    adapters_in: list[ChannelAdapter | None] = [None] * len(s_blocks)
    adapters_out: list[ChannelAdapter | None] = [None] * len(s_blocks)
    fold_targets: dict[int, list[FoldTarget]] = {}
    for cut in range(len(s_blocks) - 1):
        c_t, c_s = t_out[cut].channels, s_out[cut].channels
        if c_t == c_s:
            continue
        where = f"block {cut + 2} ('{names[cut + 1]}')"
        fold_targets[cut] = find_fold_targets(s_blocks[cut + 1], s_out[cut].shape, where=where)
        adapters_out[cut] = ChannelAdapter(c_s, c_t)
        adapters_in[cut + 1] = ChannelAdapter(c_t, c_s)

    scions = nn.ModuleList(Scion(s_blocks[i], adapters_in[i], adapters_out[i]) for i in range(len(s_blocks)))
    scions.to(next(student.parameters()).device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return GraftPlan(
        teacher=teacher,
        student=student,
        teacher_blocks=t_blocks,
        student_blocks=s_blocks,
        names=names,
        teacher_out=t_out,
        student_out=s_out,
        input_shape=input_shape,
        scions=scions,
        inherited=inherited,
        inherit_trainable=inherit_trainable,
        fold_targets=fold_targets,
    )
