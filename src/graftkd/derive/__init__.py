"""Students derived from the teacher's own weights: units chosen (depth), channels chosen (width), or both.

``derive_student(teacher, student, ...)`` fills a plain zoo student in place with teacher weights and
returns a :class:`Derivation`: what happened to every grafting block (inherited unchanged, units chosen,
channels chosen, both, or fresh with the reason) and the rules used. It is generic over the block API:
the depth derivation walks the two module trees, the width derivation the two fx graphs; no table per
architecture. A block that cannot be derived (another block type, wider than the teacher) keeps its
fresh weights, and the record says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from graftkd.derive.depth import DEPTH_RULES, DepthPlan, Underivable, apply_depth, logit_error_fn, plan_depth
from graftkd.derive.width import WIDTH_RULES, WidthPlan, load_narrowed, plan_width
from graftkd.graft.blocks import BlockList, block_names, resolve_blocks, trace_boundaries

INITS = ("auto", "derived", "fresh")
__all__ = ["DEPTH_RULES", "WIDTH_RULES", "INITS", "Derivation", "Underivable", "derive_student"]


@dataclass
class Derivation:
    depth_rule: str
    width_rule: str
    blocks: list[dict] = field(default_factory=list)
    depth: DepthPlan | None = None
    width: WidthPlan | None = None
    whole: bool = False  # the whole student came from the teacher in one piece (no per-block fallback)
    fallback_reason: str | None = None
    logit_rel_error: float | None = None  # ‖S(x) − T(x)‖² / ‖T(x)‖² on the few-shot images, before any step
    block_plans: dict[int, WidthPlan] = field(default_factory=dict)  # per-block width plans (fallback only)

    @property
    def derived_blocks(self) -> list[int]:
        return [row["block"] - 1 for row in self.blocks if row["status"] != "fresh"]

    @property
    def fresh_blocks(self) -> list[int]:
        return [row["block"] - 1 for row in self.blocks if row["status"] == "fresh"]

    def output_channels(self, block: int, last_layer: str) -> torch.Tensor | None:
        """Teacher channels the student keeps at the output of ``block`` (0-based), written by ``last_layer``
        (the block's last conv/linear: a model path when derived whole, a path in the block's view otherwise)."""
        plan = self.width if self.whole else self.block_plans.get(block)
        return next((la.out_keep for la in plan.layers if la.path == last_layer), None) if plan else None

    def input_channels(self, block: int, first_layer: str) -> torch.Tensor | None:
        """Teacher channels the student's ``block`` reads (its first conv/linear), for per-block derivations."""
        plan = self.width if self.whole else self.block_plans.get(block)
        return next((la.in_keep for la in plan.layers if la.path == first_layer), None) if plan else None

    def to_dict(self) -> dict:
        return {"depth_rule": self.depth_rule, "width_rule": self.width_rule, "whole": self.whole,
                "fallback_reason": self.fallback_reason, "logit_rel_error": self.logit_rel_error,
                "derived_blocks": [i + 1 for i in self.derived_blocks],
                "fresh_blocks": [i + 1 for i in self.fresh_blocks], "blocks": self.blocks}


def _derive_module(teacher: nn.Module, student: nn.Module, input_shape, student_input_shape, inputs,
                   depth_rule: str, width_rule: str) -> tuple[DepthPlan, WidthPlan]:
    """Depth then width, for one module pair; loads the teacher's weights into ``student`` or raises."""
    error_fn = logit_error_fn(teacher, inputs) if inputs is not None and depth_rule == "greedy" else None
    depth = plan_depth(teacher, student, depth_rule, error_fn)
    reduced = apply_depth(teacher, depth).eval()
    width = plan_width(reduced, student, tuple(input_shape), width_rule, inputs, student_input_shape)
    load_narrowed(reduced, student, width)
    return depth, width


def derive_student(
    teacher: nn.Module,
    student: nn.Module,
    input_shape: tuple[int, ...],
    *,
    inputs: torch.Tensor | None = None,
    depth_rule: str = "even",
    width_rule: str = "l1",
    teacher_blocks: BlockList = None,
    student_blocks: BlockList = None,
) -> Derivation:
    """Fill ``student`` (in place) with the teacher's weights wherever it fits inside the teacher.

    First the whole network at once (channel choices then agree across every cut). Where that is not
    possible, block by block: each block's input channels are chosen too (grafting's adapters carry the
    choice across the cut), and a block that still does not fit keeps its fresh weights.
    ``inputs``: normalised few-shot images on the models' device, needed by the data-driven rules
    (``greedy`` depth, ``activation`` width) and for the logit error in the record.
    """
    if depth_rule not in DEPTH_RULES:
        raise Underivable(f"unknown depth rule '{depth_rule}': use one of {', '.join(DEPTH_RULES)}")
    if width_rule not in WIDTH_RULES:
        raise Underivable(f"unknown width rule '{width_rule}': use one of {', '.join(WIDTH_RULES)}")
    teacher.eval()
    student.eval()
    record = Derivation(depth_rule, width_rule)
    t_blocks = resolve_blocks(teacher, teacher_blocks, role="teacher")
    s_blocks = resolve_blocks(student, student_blocks, role="student")
    names = block_names(teacher, teacher_blocks, len(t_blocks))
    if len(t_blocks) != len(s_blocks):
        raise Underivable(f"teacher has {len(t_blocks)} blocks but student has {len(s_blocks)}: "
                          "blocks are derived pairwise")
    plans: list[tuple[DepthPlan, WidthPlan, str] | None] = []
    try:
        depth, width = _derive_module(teacher, student, input_shape, None, inputs, depth_rule, width_rule)
        record.whole, record.depth, record.width = True, depth, width
        plans = [(depth, width, "")] * len(t_blocks)
    except Underivable as exc:
        record.fallback_reason = str(exc)
        sample = torch.zeros((2, *input_shape), device=next(teacher.parameters()).device)
        t_shapes = [tuple(input_shape)] + [tuple(b.shape) for b in trace_boundaries(teacher, t_blocks, sample, role="teacher")]
        s_shapes = [tuple(input_shape)] + [tuple(b.shape) for b in trace_boundaries(student, s_blocks, sample, role="student")]
        x = inputs
        for i, (t_block, s_block) in enumerate(zip(t_blocks, s_blocks)):
            try:
                depth, width = _derive_module(t_block, s_block, t_shapes[i], s_shapes[i], x, depth_rule, width_rule)
                plans.append((depth, width, f"{_prefix(student, s_block)}"))
            except Underivable as block_exc:
                plans.append(None)
                record.blocks.append({"block": i + 1, "name": names[i], "status": "fresh", "reason": str(block_exc)})
            if x is not None:
                with torch.no_grad():
                    x = t_block(x)
    paths = {id(m): n for n, m in student.named_modules()}
    rows = {row["block"]: row for row in record.blocks}
    for i, s_block in enumerate(s_blocks):
        if plans[i] is None:
            continue
        depth, width, _ = plans[i]
        # whole-model plans speak in model paths; per-block plans in paths inside the block's view
        inside = ({paths[id(m)] for m in s_block.modules() if id(m) in paths} if record.whole
                  else {n for n, _ in s_block.named_modules()})
        units = [{"path": _model_path(student, s_block, p, record.whole), "kept": sel, "of": depth.lengths[p],
                  "rule": depth_rule} for p, sel in depth.selections.items() if p in inside]
        channels = [{"layer": _model_path(student, s_block, la.path, record.whole), "kept_out": len(la.out_keep),
                     "of_out": la.teacher_out, "kept_in": len(la.in_keep), "of_in": la.teacher_in, "rule": width_rule}
                    for la in width.narrowed() if la.path in inside]
        row = {"block": i + 1, "name": names[i],
               "status": ("units and channels chosen" if units and channels else "units chosen" if units
                          else "channels chosen" if channels else "inherited")}
        if units:
            row["units"] = units
        if channels:
            row["channels"] = channels
        rows[i + 1] = row
        if not record.whole:
            record.block_plans[i] = width
    record.blocks = [rows[i + 1] for i in range(len(s_blocks))]
    if inputs is not None:
        record.logit_rel_error = logit_error_fn(teacher, inputs)(student)
    return record


def _prefix(model: nn.Module, block: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is block), "")


def _model_path(model: nn.Module, block: nn.Module, path: str, whole: bool) -> str:
    """A path inside a block's view, as a path of the model (for the record)."""
    if whole:
        return path
    target = block.get_submodule(path) if path else block
    return next((n for n, m in model.named_modules() if m is target), path)
