"""Model size and cost, reported the same way for every method so comparisons are fair."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

_UNITS = (("G", 1e9), ("M", 1e6), ("K", 1e3))


def count_params(model: nn.Module) -> int:
    """Number of parameters, trainable or frozen (buffers such as BN running stats are not counted)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, ...], device: str | torch.device = "cpu") -> int:
    """FLOPs of one forward pass on a single input of shape ``(1, *input_shape)``.

    Counted by ``torch.utils.flop_counter.FlopCounterMode``, which counts one multiply-add as **2**
    FLOPs and only counts matmul/conv-like ops (BN, ReLU, pooling, additions are free). Divide by 2 for
    the "MACs" that papers usually report (e.g. CIFAR VGG16: ~0.63 GFLOPs here = ~0.31 GMACs).
    Runs in eval mode under ``no_grad`` (the model must already be on ``device``); the model's
    train/eval modes are restored afterwards.
    """
    modes = {m: m.training for m in model.modules()}
    x = torch.zeros((1, *input_shape), device=device)
    try:
        model.eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        return int(counter.get_total_flops())
    finally:
        for m, mode in modes.items():
            m.training = mode


def format_count(n: float, unit: str | None = None, digits: int = 2) -> str:
    """Human-readable count: ``5413706 -> "5.41M"``, ``313e6 -> "0.31G"``, ``269722 -> "0.27M"``.

    Without ``unit``, picks the largest of G/M/K in which the value is at least 0.1 (the convention of
    papers' tables); ``unit`` ("G", "M", "K" or "") forces one.
    """
    if unit is not None:
        scale = dict(_UNITS).get(unit.upper(), 1.0) if unit else 1.0
        return f"{n / scale:.{digits}f}{unit.upper()}"
    for name, scale in _UNITS:
        if abs(n) >= 0.1 * scale:
            return f"{n / scale:.{digits}f}{name}"
    return f"{int(n)}" if float(n).is_integer() else f"{n:.{digits}f}"
