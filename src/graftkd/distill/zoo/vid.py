"""Variational information distillation (Ahn et al. 2019): maximise a variational bound on the mutual
information between each student stage and the teacher's. The teacher feature is modelled as a Gaussian
with mean regressed from the student feature (three 1x1 convs) and per-channel variance softplus(theta) +
eps; the loss is its negative log-likelihood without the constant, so it can be negative. Weight 1.0.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from graftkd.distill.zoo._layers import feature_map_shape, float32_math, pool_pair
from graftkd.distill.zoo.base import Distiller, Shape, register_distiller
from graftkd.errors import GraftkdError


@float32_math
def vid_loss(mean: torch.Tensor, target: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    var = (F.softplus(theta) + eps).view(1, -1, 1, 1)
    return (0.5 * ((mean - target).pow(2) / var + var.log())).mean()


@register_distiller("vid")
class VID(Distiller):
    """Where the spatial sizes differ, the larger map is average-pooled to the smaller one's size before
    the regressor (as in the reference implementation), not always the student's to the teacher's: that
    would up-sample a smaller student map. theta starts at softplus^-1(init_var - eps), init_var = 5."""

    spot_kind = "stages"
    weight = 1.0

    def __init__(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape],
                 init_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__(student_shapes, teacher_shapes)
        if not init_var > eps:
            raise GraftkdError(f"vid: init_var must exceed eps ({eps}); got {init_var}")
        self.eps = float(eps)
        regressors, thetas = [], []
        for s, t in zip(self.student_shapes, self.teacher_shapes):
            s_c = feature_map_shape(s, "vid")[0]
            t_c = feature_map_shape(t, "vid")[0]
            regressors.append(nn.Sequential(
                nn.Conv2d(s_c, t_c, kernel_size=1, bias=False), nn.ReLU(),
                nn.Conv2d(t_c, t_c, kernel_size=1, bias=False), nn.ReLU(),
                nn.Conv2d(t_c, t_c, kernel_size=1, bias=False),
            ))
            # inverse softplus, so that softplus(theta) + eps == init_var at the start
            thetas.append(nn.Parameter(torch.full((t_c,), math.log(math.expm1(init_var - eps)))))
        self.regressors = nn.ModuleList(regressors)
        self.log_scales = nn.ParameterList(thetas)

    def spot_losses(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        losses = []
        for reg, theta, s, t in zip(self.regressors, self.log_scales, student, teacher):
            s, t = pool_pair(s.float(), t.float())
            losses.append(vid_loss(reg(s), t, theta, self.eps))
        return losses
