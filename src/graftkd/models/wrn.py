"""Wide ResNets WRN-d-k for CIFAR (Zagoruyko & Komodakis, 2016) as in the RepDistiller / CRD benchmark.

Pre-activation wide basic blocks; widths 16 (stem conv), 16k, 32k, 64k; (d-4)/6 blocks per group, the
second and third groups at stride 2. A block whose width changes pre-activates its input once
(BN-ReLU) and feeds that both to its first conv and to its 1x1 ``convShortcut``; otherwise the shortcut
is the raw input. The network ends with BN-ReLU, global average pooling and ``fc``. ``state_dict`` keys
are RepDistiller's ``models/wrn.py`` ones (``block<i>.layer.<j>.bn1/conv1/bn2/conv2/convShortcut``,
``bn1``, ``fc``), so its checkpoints load directly. No dropout (the benchmark trains with rate 0).

Stages: stem conv (f0, 16x32x32), block1 (f1), block2 (f2), block3 (f3, before the final BN-ReLU), the
final BN-ReLU + pooling + flatten (f4, 64k), fc. Blocks: stem+block1, block2, block3+head.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from graftkd.models.registry import register_model
from graftkd.models.staged import StagedModel


class WideBasic(nn.Module):
    """Pre-activation block: (BN-ReLU-conv3x3)x2 plus an identity or 1x1-conv shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        if self.equal_in_out and stride != 1:
            raise ValueError("a strided block needs a width change (identity shortcut cannot downsample)")
        # attribute name kept from the reference for checkpoint compatibility
        self.convShortcut = (  # noqa: N815
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        if self.convShortcut is None:
            return x + out
        return self.convShortcut(pre) + out


class NetworkBlock(nn.Module):
    """One group of wide blocks (a ``layer`` Sequential, as in the reference's keys)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        blocks = [WideBasic(in_planes, out_planes, stride)]
        blocks += [WideBasic(out_planes, out_planes, 1) for _ in range(1, n)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(StagedModel):
    """WRN-``depth``-``widen``: depth = 6n+4."""

    input_shape = (3, 32, 32)
    stages_per_block = (2, 1, 3)

    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # reference: avg_pool2d(out, 8), the same on 8x8 maps
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)
        # the reference's init: N(0, 2/fan_out) convs (= Kaiming normal, fan_out), BN 1/0, Linear bias 0
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def stage_parts(self) -> list[list[nn.Module]]:
        return [
            [self.conv1],
            [self.block1],
            [self.block2],
            [self.block3],
            [self.bn1, self.relu, self.avgpool, self.flatten],
            [self.fc],
        ]

    def stage_names(self) -> list[str]:
        return ["stem", "block1", "block2", "block3", "pool", "fc"]


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-16-2 (0.70M params at 100 classes)."""
    return WideResNet(16, 2, num_classes=num_classes, in_channels=in_channels)


@register_model("wrn_40_1")
def wrn_40_1(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-40-1 (0.57M params at 100 classes)."""
    return WideResNet(40, 1, num_classes=num_classes, in_channels=in_channels)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-40-2 (2.26M params at 100 classes)."""
    return WideResNet(40, 2, num_classes=num_classes, in_channels=in_channels)


@register_model("wrn_16_1")
def wrn_16_1(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-16-1 (175,066 params at 10 classes): WRN-40-2's depth and width both reduced."""
    return WideResNet(16, 1, num_classes=num_classes, in_channels=in_channels)
