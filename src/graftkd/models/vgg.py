"""CIFAR VGG in the block-wise layout of the NetGraft reference release (Shen et al., AAAI 2021).

``features`` holds 5 ``nn.Sequential`` blocks, each ``conv3x3(bias)[, BN], ReLU`` repeated and closed by
``MaxPool2d(2)``; ``classifier`` is ``Linear(C5, 512), BatchNorm1d(512), Linear(512, classes)`` with no
ReLU. This layout gives ``state_dict`` keys ``features.<block>.<layer>.*`` identical to the release and
to the shared teacher file, so those load with ``strict=True`` and no key mapping. The grafting unit is
one feature block; the 6th block is ``Flatten + classifier``.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from graftkd.models.base import BlockModel
from graftkd.models.registry import register_model

#: conv widths per block (each block ends with a 2x2 max-pool).
VGG_CONFIGS: dict[str, list[list[int]]] = {
    # the paper's teacher
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    # the paper's student (5.41M params): blocks 4-5 shrunk to 256 channels
    "vgg16_graft": [[64, 64], [128, 128], [256, 256, 256], [256, 256, 256], [256, 256, 256]],
    # every width halved
    "vgg16_half": [[32, 32], [64, 64], [128, 128, 128], [256, 256, 256], [256, 256, 256]],
}


def _make_block(in_channels: int, widths: Sequence[int], batch_norm: bool) -> nn.Sequential:
    """One feature block: conv at i, [BN at i+1], ReLU next, ..., MaxPool last (the release's indices)."""
    layers: list[nn.Module] = []
    c = in_channels
    for w in widths:
        layers.append(nn.Conv2d(c, w, kernel_size=3, padding=1, bias=True))
        if batch_norm:
            layers.append(nn.BatchNorm2d(w))
        layers.append(nn.ReLU(inplace=False))
        c = w
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class VGGBlockwise(BlockModel):
    """Block-wise CIFAR VGG; ``cfg`` lists the conv widths of each of the (usually 5) blocks."""

    input_shape = (3, 32, 32)

    def __init__(
        self,
        cfg: Sequence[Sequence[int]],
        num_classes: int = 10,
        batch_norm: bool = False,
        hidden: int = 512,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.cfg = [list(widths) for widths in cfg]
        self.batch_norm = batch_norm
        blocks: list[nn.Module] = []
        c = in_channels
        for widths in self.cfg:
            blocks.append(_make_block(c, widths, batch_norm))
            c = widths[-1]
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()  # glue of the last block; no parameters, no state_dict keys
        # 32x32 input and 5 pools -> 1x1 spatial, so the classifier sees exactly C5 features.
        self.classifier = nn.Sequential(
            nn.Linear(c, hidden),
            nn.BatchNorm1d(hidden),
            nn.Linear(hidden, num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def block_parts(self) -> list[list[nn.Module]]:
        return [[b] for b in self.features] + [[self.flatten, self.classifier]]

    def block_names(self) -> list[str]:
        return [f"features.{i}" for i in range(len(self.features))] + ["classifier"]


def _vgg(cfg_name: str, num_classes: int, batch_norm: bool, **kwargs: object) -> VGGBlockwise:
    return VGGBlockwise(VGG_CONFIGS[cfg_name], num_classes=num_classes, batch_norm=batch_norm, **kwargs)  # type: ignore[arg-type]


@register_model("vgg16")
def vgg16(num_classes: int = 10, hidden: int = 512, in_channels: int = 3) -> VGGBlockwise:
    """VGG16 teacher, no batch norm in the feature blocks (14.98M params at 10 classes)."""
    return _vgg("vgg16", num_classes, False, hidden=hidden, in_channels=in_channels)


@register_model("vgg16_bn")
def vgg16_bn(num_classes: int = 10, hidden: int = 512, in_channels: int = 3) -> VGGBlockwise:
    """VGG16 teacher with batch norm (layout of the shared ``vgg16bn-cifar10`` file)."""
    return _vgg("vgg16", num_classes, True, hidden=hidden, in_channels=in_channels)


@register_model("vgg16_graft")
def vgg16_graft(num_classes: int = 10, hidden: int = 512, in_channels: int = 3) -> VGGBlockwise:
    """The paper's VGG16 student: blocks 4-5 at 256 channels (5,413,706 params at 10 classes)."""
    return _vgg("vgg16_graft", num_classes, False, hidden=hidden, in_channels=in_channels)


@register_model("vgg16_graft_bn")
def vgg16_graft_bn(num_classes: int = 10, hidden: int = 512, in_channels: int = 3) -> VGGBlockwise:
    """``vgg16_graft`` with batch norm in the feature blocks."""
    return _vgg("vgg16_graft", num_classes, True, hidden=hidden, in_channels=in_channels)


@register_model("vgg16_half")
def vgg16_half(num_classes: int = 10, hidden: int = 512, in_channels: int = 3) -> VGGBlockwise:
    """VGG16 with every conv width halved (classifier hidden width stays 512)."""
    return _vgg("vgg16_half", num_classes, False, hidden=hidden, in_channels=in_channels)


@register_model("vgg16_half_bn")
def vgg16_half_bn(num_classes: int = 10, hidden: int = 512, in_channels: int = 3) -> VGGBlockwise:
    """``vgg16_half`` with batch norm in the feature blocks."""
    return _vgg("vgg16_half", num_classes, True, hidden=hidden, in_channels=in_channels)
