"""ResNet-50 with a CIFAR stem (the CRD benchmark's ``ResNet50`` teacher), torchvision-style keys.

3x3/1 stem conv at 64 channels + BN + ReLU, no max-pool; Bottleneck blocks [3, 4, 6, 3] at widths
64/128/256/512 (expansion 4, stride on the 3x3 conv, projection ``downsample.0/1`` when the shape
changes); global average pooling; ``fc``. Keys follow torchvision (``conv1``, ``bn1``,
``layer<i>.<j>.conv1..bn3``, ``downsample``, ``fc``); RepDistiller's ``resnetv2.ResNet50`` has the same
architecture with ``shortcut`` for ``downsample`` and ``linear`` for ``fc``.

Stages (32x32): stem (f0, 64x32x32), layer1 (f1, 256x32x32), layer2 (f2, 512x16x16), layer3
(f3, 1024x8x8), layer4 (f4, 2048x4x4), pooled embedding (f5, 2048), fc.
Blocks: stem+layer1, layer2, layer3, layer4+head.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from graftkd.models.registry import register_model
from graftkd.models.resnet_imagenet import conv1x1, conv3x3, init_resnet
from graftkd.models.staged import StagedModel


class Bottleneck(nn.Module):
    """1x1 reduce - 3x3 (stride here) - 1x1 expand x4, BN after each; add shortcut; ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def make_bottleneck_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """A stage of ``blocks`` Bottlenecks; the first may project (keys ``downsample.0/1``)."""
    out = planes * Bottleneck.expansion
    downsample: nn.Module | None = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))
    layers: list[nn.Module] = [Bottleneck(inplanes, planes, stride, downsample)]
    layers += [Bottleneck(out, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNetBottleneckCifar(StagedModel):
    input_shape = (3, 32, 32)
    stages_per_block = (2, 1, 1, 3)

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = make_bottleneck_layer(64, 64, layers[0], 1)
        self.layer2 = make_bottleneck_layer(256, 128, layers[1], 2)
        self.layer3 = make_bottleneck_layer(512, 256, layers[2], 2)
        self.layer4 = make_bottleneck_layer(1024, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        init_resnet(self)  # Kaiming normal (fan_out) convs, BN 1/0: as RepDistiller's resnetv2

    def stage_parts(self) -> list[list[nn.Module]]:
        # the same calls as block_parts, cut finer: f0 stem, f1-f4 layers, f5 pooled embedding, logits
        return self._stem_layers_head(4, "fc")

    def stage_names(self) -> list[str]:
        return self._stem_layers_head_names(4, "fc")


@register_model("resnet50_cifar")
def resnet50_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNetBottleneckCifar:
    """ResNet-50 with a 3x3/1 CIFAR stem (23.71M params at 100 classes)."""
    return ResNetBottleneckCifar((3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels)
