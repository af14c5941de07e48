"""The grafting loss of Eq. 7/8: squared L2 distance between L2-normalised logits, averaged over the batch.

Normalising removes the scale gap between the logits of different architectures, so the loss measures
only the direction of the prediction. Labels are never used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalized_logit_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """(1/N) Σ_i ‖s_i/‖s_i‖ − t_i/‖t_i‖‖², computed in float32 whatever the autocast dtype."""
    s = F.normalize(student_logits.float(), dim=1)
    t = F.normalize(teacher_logits.float(), dim=1)
    return (s - t).pow(2).sum(dim=1).mean()
