"""Similarity-preserving KD (Tung & Mori 2019): match the batch's pairwise-similarity (Gram) matrices.

G = F F^T over the flattened features of the b samples, each row L2-normalised; the loss is
||G_T - G_S||_F^2 / b^2 at the last conv stage (weight 3000). Channel counts and spatial sizes may
differ between the nets: G is b x b either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from graftkd.distill.zoo._layers import flat, float32_math
from graftkd.distill.zoo.base import Distiller, register_distiller


def similarity(f: torch.Tensor) -> torch.Tensor:
    """(b, ...) -> (b, b) row-normalised Gram matrix."""
    z = flat(f)
    return F.normalize(z @ z.t(), dim=1)


@float32_math
def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    b = f_s.shape[0]
    return (similarity(f_t) - similarity(f_s)).pow(2).sum() / (b * b)


@register_distiller("sp")
class SP(Distiller):
    spot_kind = "last_conv"
    weight = 3000.0

    def spot_losses(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        return [sp_loss(s, t) for s, t in zip(student, teacher)]
