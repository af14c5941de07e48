"""Correlation congruence (Peng et al. 2019): tie the two nets' sample-to-sample correlations.

Both embeddings go through their own trainable Linear embed (to ``feat_dim``) and L2 normalisation;
with delta_i = |e_S,i - e_T,i|, the loss is the mean over consecutive samples of <delta_i, delta_i+1>
(the CRD code base's form of the correlation term). Weight 0.02; a batch of 1 has no pair: zero.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from graftkd.distill.zoo._layers import flat, flat_dim, float32_math, zero_loss
from graftkd.distill.zoo.base import Distiller, Shape, register_distiller


@float32_math
def cc_loss(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    if e_s.shape[0] < 2:
        return zero_loss(e_s, e_t)
    e_s, e_t = F.normalize(e_s, dim=1), F.normalize(e_t, dim=1)
    delta = (e_s - e_t).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


@register_distiller("cc")
class CC(Distiller):
    spot_kind = "embedding"
    weight = 0.02

    def __init__(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape], feat_dim: int = 128) -> None:
        super().__init__(student_shapes, teacher_shapes)
        self.embed_s = nn.ModuleList(nn.Linear(flat_dim(s), int(feat_dim)) for s in self.student_shapes)
        self.embed_t = nn.ModuleList(nn.Linear(flat_dim(t), int(feat_dim)) for t in self.teacher_shapes)

    def spot_losses(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        return [cc_loss(es(flat(s.float())), et(flat(t.float())))
                for es, et, s, t in zip(self.embed_s, self.embed_t, student, teacher)]
