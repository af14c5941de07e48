"""Helpers shared by the zoo's distillers (the leading underscore keeps this file out of discovery).

Trainable modules run under the caller's autocast; the loss math runs in float32 with autocast off
(:func:`float32_math`: autocast would run matrix products in half precision even on float32 inputs).
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from graftkd.errors import GraftkdError

_F = TypeVar("_F", bound=Callable)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def float32_math(fn: _F) -> _F:
    """Run ``fn`` with every floating-point tensor argument cast to float32 and autocast disabled."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with _autocast_off(device_type):
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """A float32 zero that stays connected to ``tensors`` (for batches too small for a relational loss)."""
    total = tensors[0].float().sum() * 0.0
    for t in tensors[1:]:
        total = total + t.float().sum() * 0.0
    return total


def flat(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) -> (b, prod(...)) without copying when the layout allows."""
    return x.reshape(x.shape[0], -1)


def pool_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Adaptive average pooling of a (b, C, H, W) map to ``size`` = (H', W'); the input itself if equal."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.adaptive_avg_pool2d(x, size)


def pool_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the spatially larger of two maps down to the smaller one's size (each of H, W on its own)."""
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    return pool_to(a, size), pool_to(b, size)


def feature_map_shape(shape: Sequence[int], who: str) -> tuple[int, int, int]:
    """Check that a spot holds a (C, H, W) feature map; a one-line error naming the distiller otherwise."""
    if len(shape) != 3:
        raise GraftkdError(f"{who} needs (C, H, W) feature maps at its spots; got a feature of shape {tuple(shape)}")
    return int(shape[0]), int(shape[1]), int(shape[2])


def flat_dim(shape: Sequence[int]) -> int:
    """The length of a feature once flattened (an embedding (D,) is D)."""
    return int(math.prod(shape))


class ConvReg(nn.Module):
    """FitNet's regressor: maps a student feature map onto the teacher's shape, then BatchNorm and ReLU.

    Equal sizes: 3x3 conv (pad 1). Student twice the teacher: 3x3 conv, stride 2. Student half the
    teacher: 4x4 transposed conv, stride 2. Student larger otherwise: a (1 + sH - tH) x (1 + sW - tW)
    conv without padding. Student smaller otherwise: a (1 + tH - sH) x (1 + tW - sW) transposed conv,
    stride 1 (the output of a stride-1 transposed conv grows by kernel - 1).
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        super().__init__()
        s_c, s_h, s_w = feature_map_shape(student_shape, "fitnet")
        t_c, t_h, t_w = feature_map_shape(teacher_shape, "fitnet")
        if (s_h, s_w) == (t_h, t_w):
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=1, padding=1)
        elif (s_h, s_w) == (2 * t_h, 2 * t_w):
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif (2 * s_h, 2 * s_w) == (t_h, t_w):
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        elif s_h <= t_h and s_w <= t_w:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=(1 + t_h - s_h, 1 + t_w - s_w))
        else:
            raise GraftkdError(f"fitnet: cannot regress a {s_h}x{s_w} student map onto a {t_h}x{t_w} teacher map "
                               "(one side larger, the other smaller); pick a hint spot with comparable sizes")
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))
