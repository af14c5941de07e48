"""ShuffleNetV1 / V2 for CIFAR as in the RepDistiller / CRD benchmark (``shufflev1``, ``shufflev2``).

Both follow RepDistiller's ``models/ShuffleNetv1.py`` / ``ShuffleNetv2.py`` (CIFAR ports of the
kuangliu/pytorch-cifar nets): a stride-1 1x1 conv stem to 24 channels + BN + ReLU and no max-pool,
three stages whose first block halves the resolution, average pooling, ``linear``. ``state_dict`` keys
match the reference. The reference sets no init, so these keep PyTorch's default init.

* ``shufflev1``: groups 3, stage widths 240/480/960 with 4/8/4 bottlenecks. A stride-2 bottleneck
  concatenates its branch with a 3x3/2 average-pooled shortcut (so its branch outputs width minus input
  width); the others add. The very first 1x1 conv (on the 24-channel stem) is not grouped.
  Stages: stem (f0, 24x32x32), layer1 (f1, 240x16x16), layer2 (f2, 480x8x8), layer3 (f3, 960x4x4),
  pooled embedding (f4, 960), linear. Blocks: stem+layer1, layer2, layer3+head.
* ``shufflev2`` (net size 1): stage widths 116/232/464, each a down-sampling block and then 3/7/3
  channel-split blocks, then a 1x1 conv-BN-ReLU to 1024.
  Stages: stem (f0, 24x32x32), layer1 (f1, 116x16x16), layer2 (f2, 232x8x8), layer3 (f3, 464x4x4),
  1x1 conv (f4, 1024x4x4), pooled embedding (f5, 1024), linear. Blocks: stem+layer1, layer2,
  layer3+head.

Channel shuffle and split use only fixed sizes (no ``x.size()`` unpacking), so the nets trace with
``torch.fx``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from graftkd.models.registry import register_model
from graftkd.models.staged import StagedModel


class ChannelShuffle(nn.Module):
    """[N, g*c, H, W] -> view as [N, g, c, H, W] -> swap g and c -> [N, c*g, H, W]."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (self.groups, -1)).transpose(1, 2).flatten(1, 2)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


# ---------------------------------------------------------------------------------------- V1


class ShuffleV1Bottleneck(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1, with an add (stride 1) or concat (stride 2)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, first_groups: int) -> None:
        super().__init__()
        mid = out_planes // 4
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU(inplace=False)
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3 = nn.Conv2d(mid, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()
        self.relu3 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(self.relu1(self.bn1(self.conv1(x))))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        out = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return self.relu3(out)


class ShuffleNetV1Cifar(StagedModel):
    input_shape = (3, 32, 32)
    stages_per_block = (2, 1, 3)

    def __init__(
        self,
        out_planes: Sequence[int] = (240, 480, 960),
        num_blocks: Sequence[int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU(inplace=False)
        c = 24
        layers: list[nn.Sequential] = []
        for stage, (width, n) in enumerate(zip(out_planes, num_blocks)):
            blocks: list[nn.Module] = []
            for i in range(n):
                # the stride-2 first block concatenates its input, so its branch makes width - c channels
                branch = width - c if i == 0 else width
                first_groups = 1 if stage == 0 and i == 0 else groups
                blocks.append(ShuffleV1Bottleneck(c, branch, 2 if i == 0 else 1, groups, first_groups))
                c = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # reference: avg_pool2d(out, 4), the same on 4x4 maps
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(c, num_classes)

    def stage_parts(self) -> list[list[nn.Module]]:
        # the same calls as block_parts, cut finer: f0 stem, f1-f3 layers, f4 pooled embedding, logits
        return self._stem_layers_head(3, "linear")

    def stage_names(self) -> list[str]:
        return self._stem_layers_head_names(3, "linear")


# ---------------------------------------------------------------------------------------- V2


class ShuffleV2Block(nn.Module):
    """Channel split: keep the first half, 1x1-dw3x3-1x1 on the second, concat, shuffle (groups 2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels // 2
        self.split = c
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.relu3 = nn.ReLU(inplace=False)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, : self.split], x[:, self.split :]
        out = self.relu1(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = self.relu3(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([x1, out], 1))


class ShuffleV2DownBlock(nn.Module):
    """Two stride-2 branches (dw3x3-1x1 | 1x1-dw3x3-1x1), each to out/2 channels, concat, shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU(inplace=False)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.relu3 = nn.ReLU(inplace=False)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu5 = nn.ReLU(inplace=False)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.relu3(self.bn3(self.conv3(x)))
        right = self.relu5(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2Cifar(StagedModel):
    input_shape = (3, 32, 32)
    stages_per_block = (2, 1, 4)

    def __init__(
        self,
        out_channels: Sequence[int] = (116, 232, 464, 1024),
        num_blocks: Sequence[int] = (3, 7, 3),
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        # RepDistiller replaced kuangliu's 3x3 stem by this 1x1 conv (the 3x3 is commented out there)
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU(inplace=False)
        c = 24
        layers: list[nn.Sequential] = []
        for width, n in zip(out_channels[:3], num_blocks):
            layers.append(nn.Sequential(ShuffleV2DownBlock(c, width), *[ShuffleV2Block(width) for _ in range(n)]))
            c = width
        self.layer1, self.layer2, self.layer3 = layers
        self.conv2 = nn.Conv2d(c, out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.relu2 = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # reference: avg_pool2d(out, 4), the same on 4x4 maps
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(out_channels[3], num_classes)

    def stage_parts(self) -> list[list[nn.Module]]:
        return [
            [self.conv1, self.bn1, self.relu],
            [self.layer1],
            [self.layer2],
            [self.layer3],
            [self.conv2, self.bn2, self.relu2],
            [self.avgpool, self.flatten],
            [self.linear],
        ]

    def stage_names(self) -> list[str]:
        return ["stem", "layer1", "layer2", "layer3", "conv2", "pool", "linear"]


@register_model("shufflev1")
def shufflev1(num_classes: int = 10, in_channels: int = 3) -> ShuffleNetV1Cifar:
    """RepDistiller ShuffleV1: groups 3, widths 240/480/960 (0.95M params at 100 classes)."""
    return ShuffleNetV1Cifar((240, 480, 960), (4, 8, 4), 3, num_classes=num_classes, in_channels=in_channels)


@register_model("shufflev2")
def shufflev2(num_classes: int = 10, in_channels: int = 3) -> ShuffleNetV2Cifar:
    """RepDistiller ShuffleV2 (net size 1): widths 116/232/464, 1024 (1.36M params at 100 classes)."""
    return ShuffleNetV2Cifar((116, 232, 464, 1024), (3, 7, 3), num_classes=num_classes, in_channels=in_channels)
