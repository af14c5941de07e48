"""CIFAR ResNets of the RepDistiller / CRD benchmark (Tian et al., ICLR 2020): projection shortcuts.

Depth 6n+2: a 3x3 stem, three stages of n BasicBlocks (the second and third at stride 2), global
average pooling and a linear classifier. Unlike the option-A nets in ``resnet_cifar`` (parameter-free
shortcuts), a block whose stride or width changes has a 1x1 conv + BN shortcut ("option B",
``downsample.0/1``). ``state_dict`` keys are those of RepDistiller's ``models/resnet.py`` (``conv1``,
``bn1``, ``layer<i>.<j>.conv1/bn1/conv2/bn2/downsample``, ``fc``), so its checkpoints load directly.

Widths (stem, layer1, layer2, layer3): 16/16/32/64 for ``resnet8/14`` and ``resnet<d>_b``; 32/64/128/256
for ``resnet8x4`` and ``resnet32x4`` (whose layer1 therefore opens with a projection too). The names
``resnet20/32/44/56/110`` belong to the option-A nets (the shared pretrained teachers), hence the ``_b``
suffix here.

Stages: stem (conv-BN-ReLU, f0), layer1, layer2, layer3, pooled embedding, fc.
Blocks: stem+layer1, layer2, layer3+pool+fc.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from graftkd.models.registry import register_model
from graftkd.models.resnet_imagenet import init_resnet, make_layer
from graftkd.models.staged import StagedModel


class ResNetRD(StagedModel):
    """RepDistiller CIFAR ResNet: ``depth`` = 6n+2, ``widths`` = (stem, layer1, layer2, layer3)."""

    input_shape = (3, 32, 32)
    stages_per_block = (2, 1, 3)

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n+2 with n >= 1, got {depth}")
        if len(widths) != 4:
            raise ValueError(f"widths must be (stem, layer1, layer2, layer3), got {widths}")
        n = (depth - 2) // 6
        w0, w1, w2, w3 = (int(w) for w in widths)
        self.conv1 = nn.Conv2d(in_channels, w0, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = make_layer(w0, w1, n, 1)
        self.layer2 = make_layer(w1, w2, n, 2)
        self.layer3 = make_layer(w2, w3, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # RepDistiller: AvgPool2d(8), the same on 8x8 maps
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(w3, num_classes)
        init_resnet(self)  # Kaiming normal (fan_out) convs, BN 1/0, default Linear: as the reference

    def stage_parts(self) -> list[list[nn.Module]]:
        # the same calls as block_parts, cut finer: f0 stem, f1-f3 layers, f4 pooled embedding, logits
        return self._stem_layers_head(3, "fc")

    def stage_names(self) -> list[str]:
        return self._stem_layers_head_names(3, "fc")


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@register_model("resnet8")
def resnet8(num_classes: int = 10, in_channels: int = 3) -> ResNetRD:
    """RepDistiller resnet8 (0.08M params at 100 classes)."""
    return ResNetRD(8, _NARROW, num_classes=num_classes, in_channels=in_channels)


@register_model("resnet14")
def resnet14(num_classes: int = 10, in_channels: int = 3) -> ResNetRD:
    """RepDistiller resnet14 (0.18M params at 100 classes)."""
    return ResNetRD(14, _NARROW, num_classes=num_classes, in_channels=in_channels)


@register_model("resnet20_b")
def resnet20_b(num_classes: int = 10, in_channels: int = 3) -> ResNetRD:
    """RepDistiller resnet20: projection shortcuts (0.28M params at 100 classes)."""
    return ResNetRD(20, _NARROW, num_classes=num_classes, in_channels=in_channels)


@register_model("resnet32_b")
def resnet32_b(num_classes: int = 10, in_channels: int = 3) -> ResNetRD:
    """RepDistiller resnet32: projection shortcuts (0.47M params at 100 classes)."""
    return ResNetRD(32, _NARROW, num_classes=num_classes, in_channels=in_channels)


@register_model("resnet56_b")
def resnet56_b(num_classes: int = 10, in_channels: int = 3) -> ResNetRD:
    """RepDistiller resnet56: projection shortcuts (0.86M params at 100 classes)."""
    return ResNetRD(56, _NARROW, num_classes=num_classes, in_channels=in_channels)


@register_model("resnet110_b")
def resnet110_b(num_classes: int = 10, in_channels: int = 3) -> ResNetRD:
    """RepDistiller resnet110: projection shortcuts (1.74M params at 100 classes)."""
    return ResNetRD(110, _NARROW, num_classes=num_classes, in_channels=in_channels)


@register_model("resnet8x4")
def resnet8x4(num_classes: int = 10, in_channels: int = 3) -> ResNetRD:
    """RepDistiller resnet8x4, widths 32/64/128/256 (1.23M params at 100 classes)."""
    return ResNetRD(8, _WIDE, num_classes=num_classes, in_channels=in_channels)


@register_model("resnet32x4")
def resnet32x4(num_classes: int = 10, in_channels: int = 3) -> ResNetRD:
    """RepDistiller resnet32x4, widths 32/64/128/256 (7.43M params at 100 classes)."""
    return ResNetRD(32, _WIDE, num_classes=num_classes, in_channels=in_channels)
