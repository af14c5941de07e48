"""Attention transfer (Zagoruyko & Komodakis 2017): match the spatial attention maps of every stage.

The attention map of a feature is the channel mean of f^p, flattened and L2-normalised per sample;
the loss is the mean squared difference of the two maps (the larger feature map is average-pooled to
the smaller one's size first). p = 2, weight 1000 as in the benchmark.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from graftkd.distill.zoo._layers import feature_map_shape, flat, float32_math, pool_pair
from graftkd.distill.zoo.base import Distiller, Shape, register_distiller
from graftkd.errors import GraftkdError


def attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    """(b, C, H, W) -> (b, H*W): L2-normalised channel mean of f^p."""
    return F.normalize(flat(f.pow(p).mean(dim=1)), dim=1)


@float32_math
def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float) -> torch.Tensor:
    f_s, f_t = pool_pair(f_s, f_t)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


@register_distiller("at")
class AT(Distiller):
    spot_kind = "stages"
    weight = 1000.0

    def __init__(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape], p: float = 2.0) -> None:
        super().__init__(student_shapes, teacher_shapes)
        for shape in (*self.student_shapes, *self.teacher_shapes):
            feature_map_shape(shape, "at")
        if not p > 0:
            raise GraftkdError(f"at: p must be positive; got {p}")
        self.p = float(p)

    def spot_losses(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        return [at_loss(s, t, self.p) for s, t in zip(student, teacher)]
