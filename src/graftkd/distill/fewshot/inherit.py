"""Helpers shared by the few-shot methods: inheriting teacher blocks, finding a block's module path."""
from __future__ import annotations

from torch import nn

from graftkd.errors import GraftkdError


def inherit_blocks(task) -> tuple[list[nn.Module], dict]:
    """Copy the teacher blocks the grafting plan would inherit into ``task.student`` and freeze them.

    All methods of a grid cell start from the same student this way (for VGG16 -> vgg16_graft, blocks
    1-3 are the teacher's, as in the reference grafting code). Returns the frozen student blocks, which
    the loop keeps in eval mode so their BatchNorm statistics stay the teacher's, and the facts for result.json:
    the blocks inherited (numbered from 1) and, where none could be, the plan's reason.

    With ``auto``, a pair that grafting cannot match block by block (another family: VGG16 -> ResNet-18, 6 blocks
    against 4) inherits nothing and trains whole; the plan's refusal stands only where blocks were named.
    """
    from graftkd.graft.plan import build_plan

    if task.inherit == "none" or not task.inherit:
        return [], {"inherited_blocks": []}
    try:
        plan = build_plan(task.teacher, task.student, tuple(task.images.shape[1:]), inherit=task.inherit)
    except GraftkdError as exc:
        if task.inherit == "auto":
            return [], {"inherited_blocks": [], "inherit_refused": str(exc)}
        raise
    return [plan.student_blocks[i] for i in plan.inherited], {"inherited_blocks": [i + 1 for i in plan.inherited]}


def block_output_path(model: nn.Module, index: int) -> str:
    """Module path of the last module in block ``index`` of a zoo model: its output is the block's output."""
    if not hasattr(model, "block_parts"):
        raise GraftkdError(f"{type(model).__name__} is not a zoo model with blocks; name the module path instead")
    parts = model.block_parts()
    if not -len(parts) <= index < len(parts):
        raise GraftkdError(f"block {index + 1} does not exist: the model has {len(parts)} blocks")
    target = parts[index][-1]
    for name, module in model.named_modules():
        if module is target:
            return name
    raise GraftkdError(f"block {index + 1}'s last module is not registered in {type(model).__name__}")
