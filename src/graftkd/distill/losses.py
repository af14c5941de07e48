"""Loss functions of the few-shot baselines, each with golden-value tests in tests/test_distill.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al.: KL(p_T || p_S) at temperature T, batch mean, times T² so gradients keep their scale."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def hint_loss(student_hint: torch.Tensor, teacher_hint: torch.Tensor) -> torch.Tensor:
    """FitNet: mean squared error between the regressed student feature map and the teacher's."""
    return F.mse_loss(student_hint.float(), teacher_hint.float())


def relative_feature_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """‖S − T‖² / ‖T‖² over the batch: a feature map's error relative to its energy, so every depth weighs alike."""
    s, t = student_feature.float(), teacher_feature.float()
    return ((s - t) ** 2).sum() / (t * t).sum().clamp_min(1e-12)
