"""Tiny CNNs for the 8x8 digits demo and fast tests (input 1x8x8, 10 classes).

Same block structure as the big models (conv blocks + a head block), so the whole grafting pipeline
can be exercised in seconds on CPU. ``width`` scales every conv width; ``digits_cnn_half`` is the
student (half widths, same block count and spatial sizes as ``digits_cnn``).
"""
from __future__ import annotations

import torch.nn as nn

from graftkd.models.base import BlockModel
from graftkd.models.registry import register_model


def _conv_block(c_in: int, c_out: int, batch_norm: bool, pool: bool) -> nn.Sequential:
    """conv3x3 [BN] ReLU [MaxPool2]; conv bias only when there is no BN after it."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU(inplace=False))
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class DigitsCNN(BlockModel):
    """3 conv blocks (8x8 -> 8x8 -> 4x4 -> 2x2) and a head block (global avg-pool, flatten, linear)."""

    input_shape = (1, 8, 8)

    def __init__(
        self,
        num_classes: int = 10,
        width: float = 1.0,
        batch_norm: bool = True,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        c1, c2, c3 = (max(1, int(round(c * width))) for c in (32, 64, 128))
        self.features = nn.Sequential(
            _conv_block(in_channels, c1, batch_norm, pool=False),
            _conv_block(c1, c2, batch_norm, pool=True),
            _conv_block(c2, c3, batch_norm, pool=True),
        )
        # glue lives inside the head so that the head block is exactly one submodule
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c3, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def block_parts(self) -> list[list[nn.Module]]:
        return [[b] for b in self.features] + [[self.classifier]]

    def block_names(self) -> list[str]:
        return [f"features.{i}" for i in range(len(self.features))] + ["classifier"]

    def stage_parts(self) -> list[list[nn.Module]]:
        """f0..f2 the conv blocks, f3 the pooled embedding (classifier.0-1), then the linear layer."""
        return [[b] for b in self.features] + [[self.classifier[0], self.classifier[1]], [self.classifier[2]]]

    def stage_names(self) -> list[str]:
        return [f"features.{i}" for i in range(len(self.features))] + ["embedding", "fc"]


@register_model("digits_cnn")
def digits_cnn(num_classes: int = 10, width: float = 1.0, batch_norm: bool = True, in_channels: int = 1) -> DigitsCNN:
    """Digits teacher: widths 32/64/128."""
    return DigitsCNN(num_classes=num_classes, width=width, batch_norm=batch_norm, in_channels=in_channels)


@register_model("digits_cnn_half")
def digits_cnn_half(
    num_classes: int = 10, width: float = 0.5, batch_norm: bool = True, in_channels: int = 1
) -> DigitsCNN:
    """Digits student: widths 16/32/64 (same blocks and spatial sizes as ``digits_cnn``)."""
    return DigitsCNN(num_classes=num_classes, width=width, batch_norm=batch_norm, in_channels=in_channels)
