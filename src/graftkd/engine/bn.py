"""BatchNorm re-estimation: running statistics measured label-free on a few views of the few-shot images.

One function for every caller (derived students at the start, any recipe at the end). The running
statistics are replaced by the exact mean and variance over all batches given (cumulative average,
``momentum=None``), with the model in train mode for the norms only and no gradient; affine weights
are untouched.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def tracked_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm of ``model`` that keeps running statistics (``track_running_stats``), in module order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-measure every BatchNorm's running statistics on ``batches`` (normalised inputs); returns how many norms.

    Norms whose module is frozen elsewhere (``track_running_stats=False``) are skipped. The model ends in
    eval mode.
    """
    norms = tracked_norms(model)
    if not norms:
        return 0
    momenta = {m: m.momentum for m in norms}
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over the batches
        m.train()
    try:
        seen = 0
        for x in batches:
            model(x)
            seen += 1
        if seen == 0:
            raise ValueError("reestimate_batchnorm got no batches")
    finally:
        for m in norms:
            m.momentum = momenta[m]
        model.eval()
    return len(norms)
