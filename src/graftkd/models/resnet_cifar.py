"""CIFAR ResNets: He et al. (2016) depth-6n+2 nets with option-A shortcuts, and a CIFAR ResNet-18.

``resnet20/32/44/56/110`` have the ``state_dict`` keys of the akamaster/pytorch_resnet_cifar10
checkpoints (after stripping ``module.``), so the shared pretrained teachers load with ``strict=True``.
Their shortcuts are parameter-free ("option A"): subsample by 2 and zero-pad channels, so teacher and
student stages must have equal widths at block boundaries. Blocks: stem+layer1, layer2, layer3+head;
stages (feature distillation): stem, layer1, layer2, layer3, pooled embedding, linear.

``resnet18_cifar`` is the common CIFAR ResNet-18 (3x3 stem, no max-pool, projection shortcuts) with
torchvision-style keys (``downsample.0/1``, ``fc``). Blocks: stem+layer1, layer2, layer3, layer4+head;
stages: stem, layer1, layer2, layer3, layer4, pooled embedding, fc.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from graftkd.models.base import BlockModel
from graftkd.models.registry import register_model
from graftkd.models.resnet_imagenet import init_resnet, make_layer


class ShortcutA(nn.Module):
    """Parameter-free shortcut: keep every second pixel, zero-pad ``pad`` channels on each side.

    A module (not a lambda) so that blocks stay fx-traceable and picklable; no state_dict keys.
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlockA(nn.Module):
    """relu(bn1(conv1 x)) -> bn2(conv2 .) + shortcut(x) -> relu; keys conv1/bn1/conv2/bn2 only."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        if stride != 1 or in_planes != planes:
            if stride != 2 or planes != 2 * in_planes:
                raise ValueError("option-A shortcut needs stride 2 and doubled width")
            self.shortcut: nn.Module = ShortcutA(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifarA(BlockModel):
    """Depth 6n+2 CIFAR ResNet: 3x3 conv 16 + BN + ReLU, 3 stages of n blocks (16/32/64), GAP, linear."""

    input_shape = (3, 32, 32)

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = self._make_layer(16, 16, n, 1)
        self.layer2 = self._make_layer(16, 32, n, 2)
        self.layer3 = self._make_layer(32, 64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():  # the reference implementation's init: Kaiming normal (fan_in)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = [BasicBlockA(in_planes, planes, stride)]
        layers += [BasicBlockA(planes, planes, 1) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def block_parts(self) -> list[list[nn.Module]]:
        return [
            [self.conv1, self.bn1, self.relu, self.layer1],
            [self.layer2],
            [self.layer3, self.avgpool, self.flatten, self.linear],
        ]

    def block_names(self) -> list[str]:
        return ["stem+layer1", "layer2", "layer3+head"]

    def stage_parts(self) -> list[list[nn.Module]]:
        # the same calls as block_parts, cut finer: f0 stem, f1-f3 layers, f4 pooled embedding, logits
        return self._stem_layers_head(3, "linear")

    def stage_names(self) -> list[str]:
        return self._stem_layers_head_names(3, "linear")


def _resnet_a(depth: int, num_classes: int, in_channels: int) -> ResNetCifarA:
    return ResNetCifarA((depth - 2) // 6, num_classes=num_classes, in_channels=in_channels)


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNetCifarA:
    """CIFAR ResNet-20 (269,722 params at 10 classes)."""
    return _resnet_a(20, num_classes, in_channels)


@register_model("resnet32")
def resnet32(num_classes: int = 10, in_channels: int = 3) -> ResNetCifarA:
    """CIFAR ResNet-32 (464,154 params at 10 classes)."""
    return _resnet_a(32, num_classes, in_channels)


@register_model("resnet44")
def resnet44(num_classes: int = 10, in_channels: int = 3) -> ResNetCifarA:
    """CIFAR ResNet-44 (658,586 params at 10 classes)."""
    return _resnet_a(44, num_classes, in_channels)


@register_model("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3) -> ResNetCifarA:
    """CIFAR ResNet-56 (853,018 params at 10 classes)."""
    return _resnet_a(56, num_classes, in_channels)


@register_model("resnet110")
def resnet110(num_classes: int = 10, in_channels: int = 3) -> ResNetCifarA:
    """CIFAR ResNet-110 (1,727,962 params at 10 classes)."""
    return _resnet_a(110, num_classes, in_channels)


class ResNetCifar18(BlockModel):
    """CIFAR ResNet-18: 3x3/1 stem at 64 channels, no max-pool, BasicBlocks [2,2,2,2] at 64..512."""

    input_shape = (3, 32, 32)

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = make_layer(64, 64, layers[0], 1)
        self.layer2 = make_layer(64, 128, layers[1], 2)
        self.layer3 = make_layer(128, 256, layers[2], 2)
        self.layer4 = make_layer(256, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512, num_classes)
        init_resnet(self)

    def block_parts(self) -> list[list[nn.Module]]:
        return [
            [self.conv1, self.bn1, self.relu, self.layer1],
            [self.layer2],
            [self.layer3],
            [self.layer4, self.avgpool, self.flatten, self.fc],
        ]

    def block_names(self) -> list[str]:
        return ["stem+layer1", "layer2", "layer3", "layer4+head"]

    def stage_parts(self) -> list[list[nn.Module]]:
        # the same calls as block_parts, cut finer: f0 stem, f1-f4 layers, f5 pooled embedding, logits
        return self._stem_layers_head(4, "fc")

    def stage_names(self) -> list[str]:
        return self._stem_layers_head_names(4, "fc")


@register_model("resnet18_cifar")
def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNetCifar18:
    """CIFAR ResNet-18 (11,173,962 params at 10 classes)."""
    return ResNetCifar18((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)
