"""MobileNetV2 for CIFAR as in the RepDistiller / CRD benchmark (``mobilenetv2``, ``mobilenetv2_half``).

The CIFAR variant used there (RepDistiller ``models/mobilenetv2.py``, from "Knowledge Distillation via
Route Constrained Optimization"): a stride-2 3x3 conv-BN-ReLU stem, seven groups of inverted residual
blocks (t, c, n, s) = (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
(6, 160, 3, 2), (6, 320, 1, 1) with every width scaled by the multiplier, a 1x1 conv-BN-ReLU to 1280
channels (1280 also at width < 1), average pooling and a linear classifier. Each inverted residual
always has its expansion 1x1 conv (also at t = 1, unlike torchvision) and adds its input when
stride 1 and in == out. ``state_dict`` keys match the reference (``conv1.0``, ``conv2.0``,
``classifier.0``) except that its group list ``blocks`` is called ``layers`` here (``blocks`` is the
BlockModel method), so a reference checkpoint loads after renaming ``blocks.`` -> ``layers.``.
``mobilenetv2_half`` is the benchmark's ``mobile_half`` (width 0.5).

Stages (width 1, 32x32): stem (f0, 32x16x16), groups 0-1 (f1, 24x16x16), group 2 (f2, 32x8x8),
groups 3-4 (f3, 96x4x4), groups 5-6 (f4, 320x2x2), 1x1 conv + pool + flatten (f5, 1280), classifier.
Blocks: stem+groups 0-1, group 2, groups 3-4, groups 5-6+head.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from graftkd.models.registry import register_model
from graftkd.models.staged import StagedModel

#: (expansion t, output channels c, blocks n, first stride s) of the seven groups.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=False),
    )


class InvertedResidual(nn.Module):
    """1x1 expand - BN - ReLU - 3x3 depthwise - BN - ReLU - 1x1 project - BN (+ input when shapes match)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=False),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=False),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2Cifar(StagedModel):
    """RepDistiller's CIFAR MobileNetV2 with expansion ``expansion`` (t > 1 rows) and ``width_mult``."""

    input_shape = (3, 32, 32)
    stages_per_block = (2, 1, 1, 3)

    def __init__(
        self, width_mult: float = 1.0, expansion: int = 6, num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        c = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, c, 3, 2)
        groups: list[nn.Module] = []
        for t, width, n, s in INVERTED_RESIDUAL_SETTING:
            out = int(width * width_mult)
            t = t if t == 1 else expansion
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
            groups.append(nn.Sequential(*layers))
        self.layers = nn.ModuleList(groups)  # the reference's ``blocks``
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(c, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # reference: AvgPool2d(2, ceil_mode=True), same on 2x2
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        # the reference's init: N(0, 2/fan_out) convs (= Kaiming normal, fan_out), BN 1/0,
        # Linear N(0, 0.01) with zero bias
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def stage_parts(self) -> list[list[nn.Module]]:
        g = list(self.layers)
        return [
            [self.conv1],
            [g[0], g[1]],
            [g[2]],
            [g[3], g[4]],
            [g[5], g[6]],
            [self.conv2, self.avgpool, self.flatten],
            [self.classifier],
        ]

    def stage_names(self) -> list[str]:
        return ["stem", "layers.0-1", "layers.2", "layers.3-4", "layers.5-6", "pool", "classifier"]


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int = 10, in_channels: int = 3) -> MobileNetV2Cifar:
    """CIFAR MobileNetV2, expansion 6, width 1.0 (2.35M params at 100 classes)."""
    return MobileNetV2Cifar(1.0, 6, num_classes=num_classes, in_channels=in_channels)


@register_model("mobilenetv2_half")
def mobilenetv2_half(num_classes: int = 10, in_channels: int = 3) -> MobileNetV2Cifar:
    """RepDistiller ``mobile_half``: expansion 6, width 0.5 (0.81M params at 100 classes)."""
    return MobileNetV2Cifar(0.5, 6, num_classes=num_classes, in_channels=in_channels)
