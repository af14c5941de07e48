"""The label-free quality estimate: how closely the student follows the teacher on views nobody trained on.

A pool of augmented views of the few-shot images is drawn once, with its own seed (never the training
generator), so it is the same for every method of a cell and never seen by training. On it: top-1
agreement of student and teacher (in %), and KL(teacher ‖ student) at temperature 1. Mixed views
(mixup blends of two pool images) are added when the run mixes. A user without labels can read these;
the test split stays for reporting only.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

POOL_SEED = 1_000_003  # not a training seed: the pool must not depend on, or feed, the training stream


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
    return {"agreement": 100.0 * agree / max(count, 1), "kl": kl / max(count, 1), "views": count,
            "seed": POOL_SEED}
