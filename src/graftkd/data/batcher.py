"""The few-shot images as training batches, as one object: which images (an epoch's shuffled batches, or
fixed-size batches of repeated images) and their view (crop and flip or a random-resized crop,
normalisation, mixing). One generator drives all of it, in a fixed order, so a run resumed from its
generator's state draws the same batches; teacher and student are given the very same tensor.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from graftkd.data.augment import color_jitter, random_resized_crop

Augmenter = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class FewShotBatcher:
    images: torch.Tensor  # uint8 (N, C, H, W) on ``device``
    normalize: nn.Module
    generator: torch.Generator
    device: torch.device
    augment: Augmenter | None = None  # crop and flip (the run's), or None
    mix: str = "none"  # batch-level mixing: none | mixup | cutmix | mixup+cutmix (one draw per batch)
    alpha: float = 1.0  # the mixing's Beta(alpha, alpha)
    pair_mixup: bool = False  # the paper recipe's --mixup: every image blended with a random partner
    resized_crop: float | None = None  # random-resized crops of at least this area fraction, instead of ``augment``
    flip: bool = True  # with ``resized_crop``
    channels_last: bool = False
    jitter: float = 0.0  # > 0: per-image brightness / contrast / saturation factors in 1 +- jitter
    mix_per_sample: bool = False  # True: each image draws its own partner, weight and (mixup+cutmix) kind

    def epoch(self, batch_size: int) -> list[torch.Tensor]:
        """One shuffled pass over the images as index batches."""
        return few_shot_batches(len(self.images), batch_size, self.generator, self.device)

    def repeated(self, size: int) -> torch.Tensor:
        """``size`` indices, repeating the images: the batch size does not shrink with K."""
        return repeated_batch(len(self.images), size, self.generator, self.device)

    def view(self, indices: torch.Tensor) -> torch.Tensor:
        """The augmented, normalised (and mixed) batch of ``indices``."""
        x = self.images[indices]
        if self.resized_crop is not None:
            x = random_resized_crop(x, scale=(self.resized_crop, 1.0), flip=self.flip, generator=self.generator)
        elif self.augment is not None:
            x = self.augment(x, self.generator)
        if self.jitter > 0:
            x = color_jitter(x, self.jitter, self.generator)
        mix = mix_per_sample if self.mix_per_sample else mix_batch
        x = mix(self.normalize(x), self.mix, self.alpha, self.generator)
        if self.pair_mixup and len(indices) > 1:
            weight = torch.rand((len(x), 1, 1, 1), generator=self.generator).to(x.device, x.dtype)
            partner = torch.randperm(len(x), generator=self.generator).to(x.device)
            x = torch.lerp(x[partner], x, weight)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def few_shot_batches(count: int, batch_size: int, generator: torch.Generator, device: torch.device) -> list[torch.Tensor]:
    """A shuffled epoch of index batches; a lone trailing image joins the previous batch (BatchNorm needs 2)."""
    order = torch.randperm(count, generator=generator).to(device)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2] = torch.cat([batches[-2], batches.pop()])
    return batches


def repeated_batch(count: int, batch_size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``batch_size`` indices into ``count`` images: whole shuffled passes, then a shuffled remainder."""
    passes = [torch.randperm(count, generator=generator) for _ in range(batch_size // count)]
    rest = torch.randperm(count, generator=generator)[: batch_size % count]
    return torch.cat(passes + [rest]).to(device)


def mix_batch(x: torch.Tensor, mix: str, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """Mixup or CutMix of the batch with a shuffled copy of itself (one draw per batch)."""
    if mix == "none" or len(x) < 2:
        return x
    kind = mix if mix != "mixup+cutmix" else ("mixup" if torch.rand((), generator=generator) < 0.5 else "cutmix")
    lam = _beta(alpha, generator)
    partner = torch.randperm(len(x), generator=generator).to(x.device)
    if kind == "mixup":
        return torch.lerp(x[partner], x, lam)
    h, w = x.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(h, (), generator=generator))
    cx = int(torch.randint(w, (), generator=generator))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[partner][..., y0:y1, x0:x1]
    return out


def mix_per_sample(x: torch.Tensor, mix: str, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """Mixup or CutMix with a shuffled copy of the batch, drawn per image: each image has its own weight,
    box and (for mixup+cutmix) kind, so one batch holds many kinds of mixture instead of one.

    Draws, in order: the partner permutation, N Beta weights, the kinds (N,), box centres (N,) and (N,)."""
    if mix == "none" or len(x) < 2:
        return x
    n, (h, w) = len(x), x.shape[-2:]
    partner = torch.randperm(n, generator=generator).to(x.device)
    lam = torch.tensor([_beta(alpha, generator) for _ in range(n)])
    if mix == "mixup+cutmix":
        cut = torch.rand(n, generator=generator) < 0.5
    else:
        cut = torch.full((n,), mix == "cutmix")
    side = (1.0 - lam).sqrt()
    ch, cw = (h * side).long(), (w * side).long()
    cy = torch.randint(h, (n,), generator=generator)
    cx = torch.randint(w, (n,), generator=generator)
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    box = ((rows >= (cy - ch // 2).clamp_min(0).view(n, 1, 1)) & (rows < (cy + ch // 2).clamp_max(h).view(n, 1, 1))
           & (cols >= (cx - cw // 2).clamp_min(0).view(n, 1, 1)) & (cols < (cx + cw // 2).clamp_max(w).view(n, 1, 1)))
    # per image: the weight of its own pixels (mixup: lam everywhere; cutmix: 0 inside the box, 1 outside)
    own = torch.where(cut.view(n, 1, 1), (~box).float(), lam.view(n, 1, 1).expand(n, h, w))
    return torch.lerp(x[partner], x, own.unsqueeze(1).to(x.device, x.dtype))


def _beta(alpha: float, generator: torch.Generator) -> float:
    """Beta(alpha, alpha) from the run's generator (torch.distributions has no generator argument)."""
    a = _gamma(alpha, generator)
    b = _gamma(alpha, generator)
    return a / (a + b) if a + b > 0 else 0.5


def _gamma(shape: float, generator: torch.Generator) -> float:
    # Marsaglia-Tsang; shape < 1 via the boost gamma(shape + 1) * U^(1/shape)
    boost = 1.0
    if shape < 1.0:
        boost = float(torch.rand((), generator=generator)) ** (1.0 / shape)
        shape += 1.0
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        z = float(torch.randn((), generator=generator))
        v = (1.0 + c * z) ** 3
        if v <= 0:
            continue
        u = float(torch.rand((), generator=generator))
        if math.log(max(u, 1e-300)) < 0.5 * z * z + d - d * v + d * math.log(v):
            return d * v * boost
