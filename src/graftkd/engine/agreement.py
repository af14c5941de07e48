"""The label-free quality estimate: how closely the student follows the teacher on views nobody trained on.

A pool of augmented views of the few-shot images is drawn once, with its own seed (never the training
generator), so it is the same for every method of a cell and never seen by training. On it: top-1
agreement of student and teacher (in %), and KL(teacher ‖ student) at temperature 1. Mixed views
(mixup blends of two pool images) are added when the run mixes. A user without labels can read these;
the test split stays for reporting only.

Those views are close to what training saw, and students memorise them: a fresh ResNet-20 at 25 % test accuracy
agrees with its teacher on 91-95 % of them, as a derived one at 75 % does. A second pool of *far* views (small
random-resized crops with colour jitter, farther from the training views than anything the recipes train on)
tells them apart: over 34 ResNet-20 students of every start and K its agreement ranks validation accuracy with
Spearman rho 0.85, against 0.45 for the near pool; over 19 half-width VGG students 0.70 against 0.67
(`benchmarks/label_free_study.py`, `results/label-free-study/`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

POOL_SEED = 1_000_003  # not a training seed: the pool must not depend on, or feed, the training stream
FAR_SEED = POOL_SEED + 1
FAR_VIEWS = 32  # per image: at K=1 that is 320 views, a second of a ResNet-56's time on two cores
FAR_SCALE = (0.1, 0.5)  # area fraction of the crops
FAR_JITTER = 0.4  # brightness, contrast and saturation factors drawn from U(0.6, 1.4)


@torch.no_grad()
def agreement_pool(images: torch.Tensor, normalize: nn.Module, augment: Callable | None, *, views: int = 8,
                   mixed: bool = False, seed: int = POOL_SEED) -> torch.Tensor:
    """``views`` augmented copies of every image (normalised), plus as many mixup blends when ``mixed``."""
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(views):
        x = images if augment is None else augment(images, generator)
        parts.append(normalize(x).float())
    pool = torch.cat(parts)
    if mixed:
        partner = torch.randperm(len(pool), generator=generator)
        weight = torch.rand((len(pool), 1, 1, 1), generator=generator)
        pool = torch.cat([pool, torch.lerp(pool[partner], pool, weight.to(pool.dtype))])
    return pool


@torch.no_grad()
def far_pool(images: torch.Tensor, normalize: nn.Module, *, views: int = FAR_VIEWS, seed: int = FAR_SEED) -> torch.Tensor:
    """``views`` far views of every image (normalised): a random-resized crop of 10-50 % of its area, mirrored for
    half, with colour jitter, all drawn from one generator seeded ``seed``."""
    from graftkd.data.augment import color_jitter, random_resized_crop

    generator = torch.Generator().manual_seed(seed)
    return torch.cat([normalize(color_jitter(random_resized_crop(images, scale=FAR_SCALE, generator=generator),
                                             FAR_JITTER, generator)).float() for _ in range(views)])


@torch.no_grad()
def agreement(student: nn.Module, teacher: nn.Module, pool: torch.Tensor, *, batch_size: int = 500,
              teacher_logits: torch.Tensor | None = None) -> dict:
    """Top-1 agreement (%) and mean KL(teacher ‖ student) on ``pool``; both models in eval mode."""
    student_mode, teacher_mode = student.training, teacher.training
    student.eval()
    teacher.eval()
    agree, kl, count = 0, 0.0, 0
    try:
        for start in range(0, len(pool), batch_size):
            x = pool[start:start + batch_size]
            t = teacher_logits[start:start + batch_size] if teacher_logits is not None else teacher(x).float()
            s = student(x).float()
            agree += int((s.argmax(1) == t.argmax(1)).sum())
            kl += float(F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="sum"))
            count += len(x)
    finally:
        student.train(student_mode)
        teacher.train(teacher_mode)
    return {"agreement": 100.0 * agree / max(count, 1), "kl": kl / max(count, 1), "views": count}
