"""Probabilistic knowledge transfer (Passalis & Tefas 2018): match the conditional distributions that
cosine similarities induce over the batch.

Cosine similarities mapped to [0, 1] and row-normalised give p(j | i) per net; the loss is the mean
over all (i, j) of p_T log((p_T + eps) / (p_S + eps)). Weight 30000.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from graftkd.distill.zoo._layers import flat, float32_math
from graftkd.distill.zoo.base import Distiller, Shape, register_distiller


def conditional_probabilities(f: torch.Tensor, eps: float) -> torch.Tensor:
    """(b, ...) -> (b, b): row i is p(. | i) from the cosine similarities of the flattened features."""
    z = flat(f)
    z = z / (z.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    sim = (z @ z.t() + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


@float32_math
def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float) -> torch.Tensor:
    p_s = conditional_probabilities(f_s, eps)
    p_t = conditional_probabilities(f_t, eps)
    return (p_t * ((p_t + eps) / (p_s + eps)).log()).mean()


@register_distiller("pkt")
class PKT(Distiller):
    spot_kind = "embedding"
    weight = 30000.0

    def __init__(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape], eps: float = 1e-7) -> None:
        super().__init__(student_shapes, teacher_shapes)
        self.eps = float(eps)

    def spot_losses(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        return [pkt_loss(s, t, self.eps) for s, t in zip(student, teacher)]
