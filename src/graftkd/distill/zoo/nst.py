"""Neuron selectivity transfer (Huang & Wang 2017): match the distributions of per-channel activation
patterns with an MMD under the polynomial kernel k(x, y) = (x . y)^2.

Each channel's spatial map is flattened and L2-normalised; per sample, the loss is mean k(T, T) +
mean k(S, S) - 2 mean k(S, T) over channel pairs, averaged over the batch. Weight 50, at every stage.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from graftkd.distill.zoo._layers import feature_map_shape, float32_math, pool_pair
from graftkd.distill.zoo.base import Distiller, Shape, register_distiller


def _kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of (a_i . b_j)^2 over channel pairs and samples; a (b, C1, HW), b (b, C2, HW)."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


@float32_math
def nst_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    f_s, f_t = pool_pair(f_s, f_t)
    s = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
    t = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)
    return _kernel_mean(t, t) + _kernel_mean(s, s) - 2.0 * _kernel_mean(s, t)


@register_distiller("nst")
class NST(Distiller):
    spot_kind = "stages"
    weight = 50.0

    def __init__(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        super().__init__(student_shapes, teacher_shapes)
        for shape in (*self.student_shapes, *self.teacher_shapes):
            feature_map_shape(shape, "nst")

    def spot_losses(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        return [nst_loss(s, t) for s, t in zip(student, teacher)]
