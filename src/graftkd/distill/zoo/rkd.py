"""Relational KD (Park et al. 2019): match the distances between embeddings and the angles they form.

Distance term: smooth-L1 between the pairwise Euclidean distances of the batch, each net's divided by
its own mean distance. Angle term: smooth-L1 between the cosines <e_ij, e_ik> of every triplet, e_ij
the normalised difference e_j - e_i. Loss = 25 * distance + 50 * angle, weight 1.0.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from graftkd.distill.zoo._layers import flat, float32_math, zero_loss
from graftkd.distill.zoo.base import Distiller, Shape, register_distiller

_EPS = 1e-12


def _off_diagonal(b: int, device: torch.device) -> torch.Tensor:
    return ~torch.eye(b, dtype=torch.bool, device=device)


def _normalised_distances(e: torch.Tensor) -> torch.Tensor:
    """(b, D) -> (b, b) pairwise distances over their mean; the diagonal is zero."""
    b = e.shape[0]
    sq = e.pow(2).sum(dim=1)
    d2 = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2.0 * (e @ e.t())).clamp(min=_EPS)
    d = d2.sqrt() * _off_diagonal(b, e.device)
    # every off-diagonal distance is >= sqrt(eps) > 0, so "the mean over positive distances" is this one
    return d / (d.sum() / (b * (b - 1)))


def _cosines(e: torch.Tensor) -> torch.Tensor:
    """(b, D) -> (b, b, b): entry [i, j, k] is <e_ij, e_ik>, e_ij the unit vector from e_i to e_j."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [i, j] = e_j - e_i, normalised
    return torch.bmm(diff, diff.transpose(1, 2))


@float32_math
def rkd_loss(e_s: torch.Tensor, e_t: torch.Tensor, w_d: float, w_a: float) -> torch.Tensor:
    e_s, e_t = flat(e_s), flat(e_t)
    b = e_s.shape[0]
    if b < 2:
        return zero_loss(e_s)
    # Means over the off-diagonal pairs and over the triplets (i, j, k) with j != i, k != i: the other
    # entries are zero in both nets (a zero distance, a zero difference vector), so they add nothing to
    # the sums and are left out of the counts. No boolean indexing: it would read the mask on the host.
    dist = F.smooth_l1_loss(_normalised_distances(e_s), _normalised_distances(e_t), reduction="sum")
    angle = F.smooth_l1_loss(_cosines(e_s), _cosines(e_t), reduction="sum")
    return w_d * dist / (b * (b - 1)) + w_a * angle / (b * (b - 1) * (b - 1))


@register_distiller("rkd")
class RKD(Distiller):
    spot_kind = "embedding"
    weight = 1.0

    def __init__(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape],
                 w_d: float = 25.0, w_a: float = 50.0) -> None:
        super().__init__(student_shapes, teacher_shapes)
        self.w_d, self.w_a = float(w_d), float(w_a)

    def spot_losses(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        return [rkd_loss(s, t, self.w_d, self.w_a) for s, t in zip(student, teacher)]
