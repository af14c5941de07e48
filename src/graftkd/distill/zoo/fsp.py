"""Flow of solution procedure (Yim et al. 2017): match the "FSP" matrices between consecutive stages.

G(a, b) = a b^T / HW between the (b, C1, HW) and (b, C2, HW) maps of two consecutive spots (the larger
map pooled to the smaller first); the loss per consecutive pair is the mean squared difference of the
student's and the teacher's G. Used as an init stage ("fsp-init") and, with weight 1.0, in training.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from graftkd.distill.zoo._layers import feature_map_shape, float32_math, pool_pair
from graftkd.distill.zoo.base import Distiller, InitStage, Shape, register_distiller
from graftkd.errors import GraftkdError


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(b, C1, H, W), (b, C2, H', W') -> (b, C1, C2)."""
    a, b = pool_pair(a, b)
    hw = a.shape[2] * a.shape[3]
    a = a.reshape(a.shape[0], a.shape[1], hw)
    b = b.reshape(b.shape[0], b.shape[1], hw)
    return torch.bmm(a, b.transpose(1, 2)) / hw


@float32_math
def fsp_pair_loss(s_a: torch.Tensor, s_b: torch.Tensor, t_a: torch.Tensor, t_b: torch.Tensor) -> torch.Tensor:
    return (fsp_matrix(s_a, s_b) - fsp_matrix(t_a, t_b)).pow(2).mean()


@register_distiller("fsp")
class FSP(Distiller):
    """``spot_losses`` returns one loss per consecutive PAIR of spots (k, k+1), so len(spots) - 1 entries
    (listed in ``self.pairs``); ``forward`` sums them.

    G_S and G_T must have the same size, so where a student spot has another channel count than the
    teacher's, a trainable 1x1 conv adapter maps the student feature to the teacher's channels first
    (our addition: the original method only pairs nets of equal widths). With equal widths everywhere
    the distiller has no parameters. The reference (CRD code base) uses FSP only to initialise the
    student (beta = 0 afterwards); weight 1.0 also keeps it during training.
    """

    spot_kind = "all"
    weight = 1.0

    def __init__(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape], init_epochs: int = 30) -> None:
        super().__init__(student_shapes, teacher_shapes)
        if len(self.student_shapes) < 2:
            raise GraftkdError(f"fsp needs at least 2 spots (it compares consecutive ones); "
                               f"got {len(self.student_shapes)}")
        self.init_epochs = int(init_epochs)
        self.pairs = [(k, k + 1) for k in range(len(self.student_shapes) - 1)]
        adapters: list[nn.Module] = []
        for s, t in zip(self.student_shapes, self.teacher_shapes):
            s_c, t_c = feature_map_shape(s, "fsp")[0], feature_map_shape(t, "fsp")[0]
            adapters.append(nn.Identity() if s_c == t_c else nn.Conv2d(s_c, t_c, kernel_size=1, bias=False))
        self.adapters = nn.ModuleList(adapters)

    def spot_losses(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        s = [adapter(f.float()) for adapter, f in zip(self.adapters, student)]
        return [fsp_pair_loss(s[i], s[j], teacher[i], teacher[j]) for i, j in self.pairs]

    def init_stages(self) -> list[InitStage]:
        return [InitStage(name="fsp-init", epochs=self.init_epochs, modules=self.student_modules(), loss=self.forward,
                          train_student=True)]
