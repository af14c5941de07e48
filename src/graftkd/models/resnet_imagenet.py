"""ImageNet ResNet-18/34 (He et al. 2016) with exactly torchvision's ``state_dict`` keys.

Keys match torchvision so its published checkpoints load with ``strict=True`` (torchvision itself is
not a dependency). Blocks follow the paper's Table 3: stem+layer1, layer2, layer3, layer4+head.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from graftkd.models.base import BlockModel
from graftkd.models.registry import register_model


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; projection shortcut (``downsample`` = conv1x1 + BN) when the shape changes."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        # not in-place: grafting hooks may keep references to intermediate activations
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def make_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """A stage of ``blocks`` BasicBlocks; the first one may downsample (keys ``downsample.0/1``)."""
    downsample: nn.Module | None = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
    layers: list[nn.Module] = [BasicBlock(inplanes, planes, stride, downsample)]
    layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def init_resnet(model: nn.Module) -> None:
    """torchvision's init: Kaiming-normal (fan_out) convs, BN weight 1 / bias 0; Linear keeps torch default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNetImageNet(BlockModel):
    """torchvision-layout ResNet with BasicBlocks (7x7/2 stem + 3x3/2 max-pool, widths 64..512)."""

    input_shape = (3, 224, 224)

    def __init__(self, layers: Sequence[int], num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = make_layer(64, 64, layers[0], 1)
        self.layer2 = make_layer(64, 128, layers[1], 2)
        self.layer3 = make_layer(128, 256, layers[2], 2)
        self.layer4 = make_layer(256, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()  # glue of the head block; no parameters, no state_dict keys
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)
        init_resnet(self)

    def block_parts(self) -> list[list[nn.Module]]:
        return [
            [self.conv1, self.bn1, self.relu, self.maxpool, self.layer1],
            [self.layer2],
            [self.layer3],
            [self.layer4, self.avgpool, self.flatten, self.fc],
        ]

    def block_names(self) -> list[str]:
        return ["stem+layer1", "layer2", "layer3", "layer4+head"]


@register_model("resnet18")
def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ResNetImageNet:
    """ImageNet ResNet-18 (11,689,512 params at 1000 classes)."""
    return ResNetImageNet([2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels)


@register_model("resnet34")
def resnet34(num_classes: int = 1000, in_channels: int = 3) -> ResNetImageNet:
    """ImageNet ResNet-34 (21,797,672 params at 1000 classes)."""
    return ResNetImageNet([3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels)
