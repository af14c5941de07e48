"""Per-channel normalisation constants and a device-side ``Normalizer`` module.

Images stay uint8 until they reach the device; ``Normalizer`` converts a batch to float in [0, 1] and
applies ``(x - mean) / std`` there. It is an ``nn.Module`` with buffers, so it follows ``.to(device)``
and can be prepended to a model.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from graftkd.errors import GraftkdError

__all__ = ["DATASET_STATS", "Normalizer", "stats_for", "channel_stats"]

DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "digits": ((0.5,), (0.5,)),
}


def stats_for(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` for a known dataset name; ``"cifar10/train"`` style names are accepted too."""
    key = str(name).strip().lower().split("/")[0]
    if key not in DATASET_STATS:
        raise GraftkdError(
            f"no normalisation statistics for dataset {name!r}; use one of "
            f"{', '.join(sorted(DATASET_STATS))} or compute them with graftkd.data.channel_stats(images)"
        )
    return DATASET_STATS[key]


@torch.no_grad()
def channel_stats(images: torch.Tensor, batch_size: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 ``(N, C, H, W)`` images, in [0, 1] units."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise GraftkdError(f"channel_stats needs a non-empty (N, C, H, W) tensor (got {tuple(images.shape)})")
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(torch.float64)
        if images.dtype == torch.uint8:
            x = x / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


class Normalizer(nn.Module):
    """``(x - mean) / std`` per channel; uint8 input is first scaled to [0, 1].

    Float input is assumed to be in [0, 1] already and keeps its floating dtype (float16/bfloat16
    stay so); uint8 input becomes float32. The output keeps the input's device and memory format
    (``channels_last`` in, ``channels_last`` out).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(list(std), dtype=torch.float32).reshape(1, -1, 1, 1)
        if mean_t.numel() != std_t.numel() or mean_t.numel() == 0:
            raise GraftkdError(
                f"Normalizer: mean has {mean_t.numel()} values and std has {std_t.numel()}; "
                "give one value per channel for both"
            )
        if bool((std_t <= 0).any()):
            raise GraftkdError(f"Normalizer: every std must be > 0 (got {std_t.flatten().tolist()})")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    @classmethod
    def for_dataset(cls, name: str) -> "Normalizer":
        mean, std = stats_for(name)
        return cls(mean, std)

    @property
    def channels(self) -> int:
        return int(self.mean.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise GraftkdError(f"Normalizer expects a (N, C, H, W) batch (got shape {tuple(x.shape)})")
        if x.shape[1] != self.channels:
            raise GraftkdError(
                f"Normalizer has statistics for {self.channels} channel(s) but the batch has {x.shape[1]}; "
                "use the statistics of the dataset the images come from"
            )
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div_(255.0)
        elif not x.is_floating_point():
            raise GraftkdError(f"Normalizer expects uint8 or floating images (got {x.dtype})")
        mean = self.mean.to(device=x.device, dtype=x.dtype)
        std = self.std.to(device=x.device, dtype=x.dtype)
        out = (x - mean) / std
        if channels_last and not out.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def extra_repr(self) -> str:
        return f"mean={[round(v, 4) for v in self.mean.flatten().tolist()]}, std={[round(v, 4) for v in self.std.flatten().tolist()]}"
