"""CIFAR VGGs with batch norm as in the RepDistiller / CRD benchmark (``vgg8`` and ``vgg13``).

Five conv blocks ``block0`` .. ``block4``, each a run of 3x3 conv (with bias) + BN + ReLU; as in the
reference (RepDistiller ``models/vgg.py``, ``_make_layers`` drops each block's last ReLU) the ReLU
closing a block is a separate module (``relu0`` .. ``relu4``), so the ``state_dict`` keys
(``block<i>.<j>.*``, ``classifier.*``) match the reference checkpoints. Max-pools ``pool0`` .. ``pool2``
sit between blocks 0-3; the reference applies ``pool3`` (before block4) only to 64x64 inputs, so on
32x32 CIFAR inputs block3 and block4 both run at 4x4 and this module (32x32 only) has no ``pool3``.
Global average pooling and a single ``Linear(512, classes)`` close the net.

Configs: ``vgg8`` = 'S' [[64], [128], [256], [512], [512]]; ``vgg13`` = 'B' [[64, 64], [128, 128],
[256, 256], [512, 512], [512, 512]]. (The NetGraft VGG16 family lives in ``vgg.py``.)

Stages on 32x32: block0 (f0, 64x32x32), pool0+block1 (f1, 128x16x16), pool1+block2 (f2, 256x8x8),
pool2+block3 (f3, 512x4x4), block4 (f4, 512x4x4), pooled embedding (f5, 512), classifier.
Blocks: block0+block1, block2, block3, block4+head.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from graftkd.models.registry import register_model
from graftkd.models.staged import StagedModel

#: conv widths of the five blocks (RepDistiller's cfg names).
VGG_CIFAR_CONFIGS: dict[str, list[list[int]]] = {
    "S": [[64], [128], [256], [512], [512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def _conv_block(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    """conv-BN-ReLU repeated; the block's last ReLU is left out (the model holds it)."""
    layers: list[nn.Module] = []
    c = in_channels
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(c, w, kernel_size=3, padding=1, bias=True), nn.BatchNorm2d(w)]
        if i < len(widths) - 1:
            layers.append(nn.ReLU(inplace=False))
        c = w
    return nn.Sequential(*layers)


class VGGCifar(StagedModel):
    """RepDistiller CIFAR VGG with BN; ``cfg`` lists the conv widths of the 5 blocks."""

    input_shape = (3, 32, 32)
    stages_per_block = (2, 1, 1, 3)

    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if len(cfg) != 5:
            raise ValueError(f"need 5 blocks of conv widths, got {len(cfg)}")
        c = [in_channels] + [widths[-1] for widths in cfg]
        self.block0 = _conv_block(c[0], cfg[0])
        self.block1 = _conv_block(c[1], cfg[1])
        self.block2 = _conv_block(c[2], cfg[2])
        self.block3 = _conv_block(c[3], cfg[3])
        self.block4 = _conv_block(c[4], cfg[4])
        # one ReLU module per block: each is the last part of a stage, called once per forward
        self.relu0 = nn.ReLU(inplace=False)
        self.relu1 = nn.ReLU(inplace=False)
        self.relu2 = nn.ReLU(inplace=False)
        self.relu3 = nn.ReLU(inplace=False)
        self.relu4 = nn.ReLU(inplace=False)
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c[5], num_classes)
        # the reference's init: N(0, 2/fan_out) convs (= Kaiming normal, fan_out), zero biases,
        # BN 1/0, Linear N(0, 0.01) with zero bias
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def stage_parts(self) -> list[list[nn.Module]]:
        return [
            [self.block0, self.relu0],
            [self.pool0, self.block1, self.relu1],
            [self.pool1, self.block2, self.relu2],
            [self.pool2, self.block3, self.relu3],
            [self.block4, self.relu4],
            [self.pool4, self.flatten],
            [self.classifier],
        ]

    def stage_names(self) -> list[str]:
        return ["block0", "block1", "block2", "block3", "block4", "pool", "classifier"]


@register_model("vgg8")
def vgg8(num_classes: int = 10, in_channels: int = 3) -> VGGCifar:
    """RepDistiller vgg8 (``vgg8_bn``, cfg 'S'; 3.97M params at 100 classes)."""
    return VGGCifar(VGG_CIFAR_CONFIGS["S"], num_classes=num_classes, in_channels=in_channels)


@register_model("vgg13")
def vgg13(num_classes: int = 10, in_channels: int = 3) -> VGGCifar:
    """RepDistiller vgg13 (``vgg13_bn``, cfg 'B'; 9.46M params at 100 classes)."""
    return VGGCifar(VGG_CIFAR_CONFIGS["B"], num_classes=num_classes, in_channels=in_channels)
