"""Activation boundaries (Heo et al. 2019): the student learns where the teacher's neurons switch on.

A connector (1x1 conv + BatchNorm) maps each student stage onto the teacher's channels; a squared
hinge with margin m = 1 pushes each response c above +m where the teacher's pre-activation t > 0 and
below -m where t <= 0. Used as an init stage ("ab-init") and, with weight 1.0, during training.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from graftkd.distill.zoo._layers import feature_map_shape, float32_math, pool_pair
from graftkd.distill.zoo.base import Distiller, InitStage, Shape, register_distiller
from graftkd.errors import GraftkdError


@float32_math
def ab_loss(c: torch.Tensor, t: torch.Tensor, margin: float) -> torch.Tensor:
    off = ((c > -margin) & (t <= 0)).float()  # teacher neuron off: push c below -margin
    on = ((c <= margin) & (t > 0)).float()    # teacher neuron on: push c above +margin
    return ((c + margin).pow(2) * off + (c - margin).pow(2) * on).mean()


def connector(c_in: int, c_out: int) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # the reference's N(0, 2/n)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out))


@register_distiller("ab")
class AB(Distiller):
    """Per-spot loss: the MEAN over elements of the boundary loss. The reference implementation sums,
    divides by the batch size and by 1000/3 and weights stage i by 2^(i-n+1); here per-spot losses
    stay unweighted (spot weighting is the loop's business) and the mean makes the scale independent of
    the feature size, so no extra 1/1000 is applied. The reference (CRD code base) uses AB only to
    initialise the student (beta = 0 afterwards); weight 1.0 also keeps it during training (set the
    loop's beta to 0 to reproduce the reference).

    The method is defined on the teacher's pre-ReLU responses. The loss reads
    whatever features the loop taps; on post-ReLU features, t <= 0 simply means t == 0. Where the
    spatial sizes differ, the larger map is average-pooled to the smaller one's size (student or teacher).
    """

    spot_kind = "stages"
    weight = 1.0

    def __init__(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape],
                 margin: float = 1.0, init_epochs: int = 30) -> None:
        super().__init__(student_shapes, teacher_shapes)
        if not margin >= 0:
            raise GraftkdError(f"ab: margin must be >= 0; got {margin}")
        self.margin = float(margin)
        self.init_epochs = int(init_epochs)
        self.connectors = nn.ModuleList(
            connector(feature_map_shape(s, "ab")[0], feature_map_shape(t, "ab")[0])
            for s, t in zip(self.student_shapes, self.teacher_shapes))

    def spot_losses(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        losses = []
        for conn, s, t in zip(self.connectors, student, teacher):
            s, t = pool_pair(s.float(), t.float())
            losses.append(ab_loss(conn(s), t, self.margin))
        return losses

    def student_modules(self) -> list[nn.Module]:
        return [self.connectors]

    def init_stages(self) -> list[InitStage]:
        return [InitStage(name="ab-init", epochs=self.init_epochs, modules=[self.connectors], loss=self.forward,
                          train_student=True)]
