"""Test-set evaluation: inference mode, large batches, one host sync per batch at most.

The test set is only ever used to *report* a model; nothing in graftkd selects a model on it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from graftkd.engine.runtime import autocast


@torch.inference_mode()
def predict_logits(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    normalize: nn.Module,
    device: torch.device,
    *,
    batch_size: int = 500,
    precision: str = "fp32",
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "eval",
) -> torch.Tensor:
    """Logits (float32, on CPU) of ``forward`` for uint8 ``images``, batch by batch on ``device``."""
    normalize = normalize.to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    outputs = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        x = normalize(images[start : start + batch_size].to(device, non_blocking=True))
        with autocast(device, precision):
            outputs.append(forward(x.contiguous(memory_format=memory_format)).float())
    return torch.cat(outputs).cpu()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    if len(logits) != len(labels):
        raise ValueError(f"{len(logits)} predictions for {len(labels)} labels")
    return float((logits.argmax(dim=1) == labels.cpu()).float().mean() * 100.0)


def evaluate_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    normalize: nn.Module,
    device: torch.device,
    **kwargs,
) -> float:
    """Top-1 accuracy (%) of ``model`` in eval mode; restores its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        return accuracy(predict_logits(model, images, normalize, device, **kwargs), labels)
    finally:
        model.train(was_training)
