"""More training images from the teacher itself: mixed views of the few-shot images, optimised so that every
BatchNorm layer of the teacher sees batch statistics equal to its running statistics.

A teacher's running statistics summarise the images it was trained on. DeepInversion (Yin et al., CVPR 2020)
inverts them from noise over thousands of steps; started from mixed, cropped and flipped few-shot images, a
hundred steps suffice to move a batch towards the teacher's training distribution. The loss is
DeepInversion's: the BatchNorm term (the norms of the mean and variance gaps, summed over layers),
cross-entropy towards a random class per image (so the images spread over the classes and their boundaries),
and a small smoothness prior. No label is used; the images come back as uint8, as the few-shot set is.

Why it matters: a derived student agrees with its teacher on 93-96 % of the few-shot images' views yet scores
75-84 % on held-out images (results/cifar10-derived/NOTES.md): the few images limit it, not the start.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from graftkd.errors import GraftkdError

__all__ = ["Inversion", "batch_gap", "invert_batchnorm"]

# a batch of 200 VGG16-BN inversions takes minutes on a CPU: say where it is at least this often (seconds)
REPORT_EVERY_S = 30.0


@dataclass(frozen=True)
class Inversion:
    """How many images to make and how: ``steps`` Adam steps per batch of ``batch_size`` at peak rate ``lr``
    (cosine to zero), loss weights ``bn`` (BatchNorm statistics), ``ce`` (a random class) and ``tv`` (smoothness,
    in normalised units)."""

    count: int
    steps: int = 100
    batch_size: int = 200
    lr: float = 0.05
    bn: float = 1.0
    ce: float = 1.0
    tv: float = 1.0

    def __post_init__(self) -> None:
        if self.count < 0 or self.count == 1 or self.steps < 1 or self.batch_size < 2:
            raise GraftkdError(f"synthetic images: a count of 0 or at least 2, steps >= 1 and a batch size >= 2 are "
                               f"needed, since BatchNorm statistics need a batch (got {self.count}, {self.steps}, "
                               f"{self.batch_size})")

    def batches(self) -> list[int]:
        """Batch sizes as even as possible, none above ``batch_size`` (so none of one image)."""
        n = math.ceil(self.count / self.batch_size) if self.count else 0
        return [self.count // n + (i < self.count % n) for i in range(n)]

    def to_dict(self) -> dict:
        return asdict(self)


def batch_gap(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``‖batch mean − mean‖ + ‖batch variance − var‖`` of ``x`` per channel (biased variance), for what a
    BatchNorm reads: (N, C, H, W), and (N, C) or (N, C, L) for a BatchNorm1d (VGG16-BN's classifier has two).

    The statistics are reductions over the rows of an (N·H·W, C) view, a view without a copy for the
    channels_last batches the inversion makes: 1.11x faster per inversion step than reducing over dims (0, 2, 3)
    at batch 200 on 2 threads, 1.41x at batch 100 on 1 (``benchmarks/synth_speed.py``), with the same centred
    variance."""
    rows = x.movedim(1, -1).reshape(-1, x.shape[1]).float()
    batch_mean = rows.mean(0)
    batch_var = (rows - batch_mean).square().mean(0)
    return torch.linalg.vector_norm(batch_mean - mean) + torch.linalg.vector_norm(batch_var - var)


def invert_batchnorm(model: nn.Module, normalize: nn.Module, images: torch.Tensor, spec: Inversion, *,
                     generator: torch.Generator, num_classes: int, precision: torch.dtype | None = None,
                     report: Callable[[str], None] | None = None) -> tuple[torch.Tensor, dict]:
    """``spec.count`` uint8 images made from ``images`` (uint8 ``(N, C, H, W)``) and ``model``'s BatchNorm
    statistics; returns them and a record (loss at the first and last step of each batch, seconds).

    ``model`` is left as it was (eval mode, its parameters' ``requires_grad`` restored, no hooks). Every draw
    comes from ``generator``, so a run with the same seed and thread count makes the same images.
    """
    from graftkd.data.augment import random_crop_flip

    from graftkd.engine.bn import tracked_norms

    norms = tracked_norms(model)
    if not norms:
        raise GraftkdError("synthetic images invert the teacher's BatchNorm statistics, and this teacher has no "
                           "BatchNorm layer: set synth to 0")
    if images.dtype != torch.uint8 or images.dim() != 4 or len(images) == 0:
        raise GraftkdError(f"synthetic images start from uint8 (N, C, H, W) images (got {images.dtype} "
                           f"{tuple(images.shape)})")
    device = images.device
    was_training = model.training
    grads = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gaps: list[torch.Tensor] = []

    def hook(module, inputs, output):
        gaps.append(batch_gap(inputs[0], module.running_mean, module.running_var))

    handles = [m.register_forward_hook(hook) for m in norms]
    mean = normalize.mean.view(1, -1, 1, 1).to(device)
    std = normalize.std.view(1, -1, 1, 1).to(device)
    low, high = -mean / std, (1 - mean) / std
    started = said = time.perf_counter()
    batches = spec.batches()
    made, log = [], []
    try:
        start = 0
        for index, b in enumerate(batches):
            first = torch.randint(len(images), (b,), generator=generator).to(device)
            second = torch.randint(len(images), (b,), generator=generator).to(device)
            lam = torch.rand((b, 1, 1, 1), generator=generator).to(device)  # Beta(1, 1): mixup's weights
            x0 = (lam * random_crop_flip(images[first], generator=generator).float()
                  + (1 - lam) * random_crop_flip(images[second], generator=generator).float())
            x = ((x0 / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last).requires_grad_(True)
            targets = torch.randint(num_classes, (b,), generator=generator).to(device)
            optimizer = torch.optim.Adam([x], lr=spec.lr, betas=(0.5, 0.9))
            for step in range(spec.steps):
                for group in optimizer.param_groups:
                    group["lr"] = spec.lr * 0.5 * (1 + math.cos(math.pi * step / spec.steps))
                gaps.clear()
                with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
                    logits = model(x)
                bn = torch.stack(gaps).sum()
                ce = F.cross_entropy(logits.float(), targets)
                tv = (((x[:, :, 1:, :] - x[:, :, :-1, :]) ** 2).mean()
                      + ((x[:, :, :, 1:] - x[:, :, :, :-1]) ** 2).mean())
                loss = spec.bn * bn + spec.ce * ce + spec.tv * tv
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, high), low))  # inside the image range
                if report is not None and 0 < step < spec.steps - 1 and time.perf_counter() - said >= REPORT_EVERY_S:
                    said = time.perf_counter()
                    report(f"synthetic images: batch {index + 1}/{len(batches)}, step {step + 1}/{spec.steps} "
                           f"({said - started:.0f} s)")
                if step in (0, spec.steps - 1):
                    log.append({"first_image": start, "step": step, "bn": round(float(bn.detach()), 4),
                                "ce": round(float(ce.detach()), 4), "tv": round(float(tv.detach()), 5)})
            with torch.no_grad():
                made.append(((x.detach() * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8).contiguous())
            if report is not None:
                said = time.perf_counter()
                report(f"synthetic images: {start + b}/{spec.count} ({time.perf_counter() - started:.0f} s; "
                       f"BatchNorm gap {log[-2]['bn']:.1f} -> {log[-1]['bn']:.1f})")
            start += b
    finally:
        for h in handles:
            h.remove()
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(was_training)
    out = torch.cat(made) if made else images[:0].clone()
    return out, {**spec.to_dict(), "made": len(out), "seconds": round(time.perf_counter() - started, 2), "log": log}
