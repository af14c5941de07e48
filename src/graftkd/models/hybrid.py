"""Hybrid networks for partial grafting (the paper's Table 3): the teacher with chosen blocks replaced.

``HybridModel(teacher_arch, student_arch, replace)`` is the teacher's block list in which the blocks
numbered in ``replace`` (1-based, as the paper counts) are the student's. It is an architecture of its
own: ``arch_options`` (teacher_arch, student_arch, replace) plus ``num_classes`` rebuild it, and its
``state_dict`` holds the weights. Grafting it into its teacher trains only the replaced blocks; the kept
ones are inherited (identical architecture, teacher weights, frozen).

Where a replaced block meets a kept one, the channel widths must agree (the kept teacher block expects
the teacher's width); runs of adjacent replaced blocks may have any widths between them (grafting's
adapters fold into the next replaced block).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from graftkd.errors import GraftkdError
from graftkd.models.base import BlockModel
from graftkd.models.registry import build_model, register_model


class HybridModel(BlockModel):
    def __init__(self, teacher_arch: str, student_arch: str, replace: Sequence[int], num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        kwargs = {} if in_channels == 3 else {"in_channels": in_channels}
        teacher = build_model(teacher_arch, num_classes=num_classes, **kwargs)
        student = build_model(student_arch, num_classes=num_classes, **kwargs)
        t_blocks, s_blocks = teacher.blocks(), student.blocks()
        if len(t_blocks) != len(s_blocks):
            raise GraftkdError(f"{teacher_arch} has {len(t_blocks)} blocks but {student_arch} {len(s_blocks)}: "
                               "partial grafting swaps block l of one for block l of the other")
        replace = sorted({int(r) for r in replace})
        if not replace or any(not 1 <= r <= len(t_blocks) for r in replace):
            raise GraftkdError(f"--replace {replace}: blocks are numbered 1..{len(t_blocks)} "
                               f"({', '.join(teacher.block_names())})")
        chosen = [r - 1 for r in replace]
        self.parts = nn.ModuleList(s_blocks[i] if i in chosen else t_blocks[i] for i in range(len(t_blocks)))
        names = teacher.block_names()
        self.names = [f"{names[i]} ({student_arch if i in chosen else teacher_arch})" for i in range(len(names))]
        self.input_shape = tuple(getattr(teacher, "input_shape", (3, 32, 32)))
        self.arch_options = {"teacher_arch": teacher_arch, "student_arch": student_arch, "replace": replace}
        self._check_widths(teacher, chosen)

    def _check_widths(self, teacher: nn.Module, chosen: list[int]) -> None:
        x = torch.zeros(2, *self.input_shape)
        was = [m.training for m in (self, teacher)]
        self.eval(), teacher.eval()
        with torch.no_grad():
            t, h = x, x
            for i, (t_block, h_block) in enumerate(zip(teacher.blocks(), self.parts)):
                t = t_block(t)
                try:
                    h = h_block(h)
                except RuntimeError as exc:
                    raise GraftkdError(
                        f"hybrid block {i + 1} ('{self.names[i]}') cannot take the previous block's output "
                        f"{tuple(h.shape[1:])}: a replaced block must keep the teacher's widths where it meets a "
                        f"kept block ({str(exc).splitlines()[0]})") from None
                boundary = (i in chosen) != (i + 1 in chosen) and i + 1 < len(self.parts)
                if boundary and h.shape != t.shape:
                    raise GraftkdError(
                        f"block {i + 1} ('{self.names[i]}') outputs {tuple(h.shape[1:])} but the teacher's "
                        f"{tuple(t.shape[1:])} there, and the next block is {'kept' if i in chosen else 'replaced'}: "
                        "replace both blocks, or neither")
        self.train(was[0]), teacher.train(was[1])

    def block_parts(self) -> list[list[nn.Module]]:
        return [[part] for part in self.parts]

    def block_names(self) -> list[str]:
        return list(self.names)


@register_model("hybrid")
def hybrid(num_classes: int = 10, teacher_arch: str = "resnet56", student_arch: str = "resnet20",
           replace: Sequence[int] = (1,), in_channels: int = 3) -> HybridModel:
    """The teacher with the blocks in ``replace`` (1-based) taken from the student (partial grafting)."""
    return HybridModel(teacher_arch, student_arch, replace, num_classes=num_classes, in_channels=in_channels)


def block_params(model: nn.Module) -> list[int]:
    """Parameters per block (Table 3's per-block counts)."""
    return [sum(p.numel() for p in block.parameters()) for block in model.blocks()]
