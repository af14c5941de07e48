"""FitNet hints (Romero et al. 2015): regress the student's feature onto the teacher's, MSE.

The one FitNet of graftkd. The full-data benchmark adds it to KD at FitNet's spot (``spot_kind``), and the
few-shot ``fitnet`` method (:mod:`graftkd.distill.fewshot.fitnet`) runs it as FitNet's own first stage, at a block
boundary it chooses. What differs between the two is the regressor only:

- ``"convreg"`` (the benchmark's): a conv or transposed conv chosen by the two spatial sizes, then BatchNorm
  and ReLU; a Linear layer for embedding spots. The weight is 1.0 (the spot-adaptive KD spec); the CRD code
  base uses 100 for the same loss.
- ``"1x1"``: a bias-free 1x1 conv, for maps of the same spatial size (the few-shot method's: few images
  cannot train the BatchNorm of a ConvReg).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from graftkd.distill.losses import hint_loss
from graftkd.distill.zoo._layers import ConvReg, float32_math
from graftkd.distill.zoo.base import Distiller, Shape, register_distiller
from graftkd.errors import GraftkdError

REGRESSORS = ("convreg", "1x1")
_mse = float32_math(hint_loss)


def _regressor(kind: str, s: Shape, t: Shape) -> nn.Module:
    if len(s) == 1 and len(t) == 1:
        return nn.Linear(s[0], t[0])
    if len(s) != 3 or len(t) != 3:
        raise GraftkdError(f"fitnet: student feature {s} and teacher feature {t} are not both maps (C, H, W) "
                           "or both embeddings (D,)")
    if kind == "convreg":
        return ConvReg(s, t)
    if s[1:] != t[1:]:
        raise GraftkdError(f"fitnet: a 1x1 regressor needs maps of one size, got student {s} and teacher {t}; "
                           "use regressor='convreg'")
    return nn.Conv2d(s[0], t[0], kernel_size=1, bias=False)


@register_distiller("fitnet")
class FitNet(Distiller):
    spot_kind = "hint"
    weight = 1.0

    def __init__(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape],
                 regressor: str = "convreg") -> None:
        super().__init__(student_shapes, teacher_shapes)
        if regressor not in REGRESSORS:
            raise GraftkdError(f"fitnet: unknown regressor {regressor!r}; use one of {', '.join(REGRESSORS)}")
        self.regressors = nn.ModuleList(_regressor(regressor, s, t)
                                        for s, t in zip(self.student_shapes, self.teacher_shapes))

    def spot_losses(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        return [_mse(reg(s.float()), t) for reg, s, t in zip(self.regressors, student, teacher)]
