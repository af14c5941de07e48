"""Factor transfer (Kim et al. 2018): the student, through a translator, imitates the teacher's
"factors", the code of a paraphraser auto-encoder trained beforehand on the teacher's feature.

factor(x) = the flattened code, L2-normalised per sample; the loss is the mean absolute difference of
the two factors at the last conv stage (weight 200, paraphrase rate 0.5).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from graftkd.distill.zoo._layers import feature_map_shape, flat, float32_math, pool_pair
from graftkd.distill.zoo.base import Distiller, InitStage, Shape, register_distiller
from graftkd.errors import GraftkdError


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1)


def _deconv(c_in: int, c_out: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(c_in, c_out, kernel_size=3, stride=1, padding=1)


class Paraphraser(nn.Module):
    """A size-preserving conv auto-encoder on the teacher's feature (no BatchNorm, LeakyReLU(0.1)).

    The decoder ends with a LeakyReLU too, as the reference implementation does: the features it
    reconstructs come after a ReLU.
    """

    def __init__(self, channels: int, factor_channels: int) -> None:
        super().__init__()
        c, f = channels, factor_channels
        self.encoder = nn.Sequential(_conv(c, c), nn.LeakyReLU(0.1), _conv(c, f), nn.LeakyReLU(0.1),
                                     _conv(f, f), nn.LeakyReLU(0.1))
        self.decoder = nn.Sequential(_deconv(f, f), nn.LeakyReLU(0.1), _deconv(f, c), nn.LeakyReLU(0.1),
                                     _deconv(c, c), nn.LeakyReLU(0.1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def translator(channels: int, factor_channels: int) -> nn.Sequential:
    """The student's side: three 3x3 convs, each with BatchNorm and LeakyReLU(0.1)."""
    c, f = channels, factor_channels
    return nn.Sequential(_conv(c, c), nn.BatchNorm2d(c), nn.LeakyReLU(0.1),
                         _conv(c, f), nn.BatchNorm2d(f), nn.LeakyReLU(0.1),
                         _conv(f, f), nn.BatchNorm2d(f), nn.LeakyReLU(0.1))


@float32_math
def factor_loss(code_s: torch.Tensor, code_t: torch.Tensor) -> torch.Tensor:
    code_s, code_t = pool_pair(code_s, code_t)
    return (F.normalize(flat(code_s), dim=1) - F.normalize(flat(code_t), dim=1)).abs().mean()


@float32_math
def _reconstruction_loss(reconstructed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(reconstructed, target)


@register_distiller("ft")
class FT(Distiller):
    """Trainable: the translators (student optimiser). The paraphrasers train only in the "ft-paraphraser"
    init stage (reconstructing the teacher feature) and are frozen after it; their codes are detached."""

    spot_kind = "last_conv"
    weight = 200.0

    def __init__(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape],
                 rate: float = 0.5, paraphraser_epochs: int = 30) -> None:
        super().__init__(student_shapes, teacher_shapes)
        if not rate > 0:
            raise GraftkdError(f"ft: rate must be positive; got {rate}")
        self.paraphraser_epochs = int(paraphraser_epochs)
        paraphrasers, translators = [], []
        for s, t in zip(self.student_shapes, self.teacher_shapes):
            s_c = feature_map_shape(s, "ft")[0]
            t_c = feature_map_shape(t, "ft")[0]
            f_c = max(1, int(t_c * rate))
            paraphrasers.append(Paraphraser(t_c, f_c))
            translators.append(translator(s_c, f_c))
        self.paraphrasers = nn.ModuleList(paraphrasers)
        self.translators = nn.ModuleList(translators)

    def spot_losses(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        losses = []
        for para, trans, s, t in zip(self.paraphrasers, self.translators, student, teacher):
            with torch.no_grad():  # the paraphraser is not trained here
                code_t = para.encode(t.float())
            losses.append(factor_loss(trans(s.float()), code_t))
        return losses

    def paraphraser_loss(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        """Reconstruction MSE of the teacher features, summed over spots (the student is not read)."""
        return torch.stack([_reconstruction_loss(para(t.float()), t)
                            for para, t in zip(self.paraphrasers, teacher)]).sum()

    def student_modules(self) -> list[nn.Module]:
        return [self.translators]

    def init_stages(self) -> list[InitStage]:
        return [InitStage(name="ft-paraphraser", epochs=self.paraphraser_epochs, modules=[self.paraphrasers],
                          loss=self.paraphraser_loss, train_student=False, lr=0.01, momentum=0.9,
                          weight_decay=5e-4, freeze_after=[self.paraphrasers])]
