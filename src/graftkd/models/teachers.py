"""Loading pretrained teachers from files, with the input normalisation they were trained with."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from graftkd.errors import GraftkdError
from graftkd.models.convert import (
    detect_vgg_batch_norm,
    from_netgraft_release,
    load_into,
    read_checkpoint,
    strip_prefix,
)
from graftkd.models.registry import build_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

#: normalisation used when the file does not carry its own ``mean``/``std``.
#: The akamaster CIFAR ResNets were trained with the ImageNet constants, so those are their defaults.
DEFAULT_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "resnet20": (IMAGENET_MEAN, IMAGENET_STD),
    "resnet32": (IMAGENET_MEAN, IMAGENET_STD),
    "resnet44": (IMAGENET_MEAN, IMAGENET_STD),
    "resnet56": (IMAGENET_MEAN, IMAGENET_STD),
    "resnet110": (IMAGENET_MEAN, IMAGENET_STD),
    "resnet18": (IMAGENET_MEAN, IMAGENET_STD),
    "resnet34": (IMAGENET_MEAN, IMAGENET_STD),
    "resnet18_cifar": (CIFAR10_MEAN, CIFAR10_STD),
    "digits_cnn": ((0.0,), (1.0,)),  # digits inputs are already scaled to [0, 1]; no normalisation
    "digits_cnn_half": ((0.0,), (1.0,)),
}


def default_normalization(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) to use for ``arch`` when its checkpoint does not say; VGGs use the CIFAR-10 stats."""
    key = arch.strip().lower()
    if key in DEFAULT_NORMALIZATION:
        return DEFAULT_NORMALIZATION[key]
    if key.startswith("vgg"):
        return CIFAR10_MEAN, CIFAR10_STD
    return IMAGENET_MEAN, IMAGENET_STD


def _file_classes(model: nn.Module, sd: dict) -> int | None:
    """The class count a state dict was saved with, when it differs from ``model``'s only in that dimension.

    Only the classifier's tensors depend on the class count, and only in their first dimension; a file
    that differs from the model anywhere else is some other architecture (``load_into`` says so).
    """
    own = model.state_dict()
    shapes = {k: (tuple(sd[k].shape), tuple(own[k].shape)) for k in own
              if k in sd and isinstance(sd[k], torch.Tensor) and sd[k].shape != own[k].shape}
    if not shapes or any(len(f) != len(m) or f[1:] != m[1:] for f, m in shapes.values()):
        return None
    counts = {f[0] for f, _ in shapes.values()}
    return counts.pop() if len(counts) == 1 else None


def load_pretrained(arch: str, path: str | os.PathLike, num_classes: int | None = 10) -> tuple[nn.Module, dict[str, Any]]:
    """Build zoo model ``arch`` and load ``path`` into it strictly.

    Returns ``(model, meta)``: the model in eval mode and float32; ``meta`` has ``mean``/``std`` (from the
    file when it has them, else the arch default), ``classes`` (when the file lists them), ``arch``,
    ``source`` and ``reported_acc`` (the file's ``test_acc``/``best_prec1`` when present).
    """
    sd, extras = read_checkpoint(path)
    options = dict(extras.get("arch_options") or {})  # e.g. a partial-grafting hybrid's blocks
    model = build_model(arch, num_classes=num_classes or 10, **options)
    sd = strip_prefix(sd, "module.")  # akamaster files were saved from DataParallel
    key = arch.strip().lower()
    if key.startswith("vgg") and hasattr(model, "batch_norm"):
        has_bn = detect_vgg_batch_norm(sd)
        if has_bn != model.batch_norm:
            other = f"{key}_bn" if has_bn else key.removesuffix("_bn")
            kind = "with" if has_bn else "without"
            raise GraftkdError(f"{path} holds a VGG {kind} batch norm, unlike {key}; use --teacher-arch {other}")
        sd = from_netgraft_release(sd, batch_norm=has_bn)
    file_classes = _file_classes(model, sd)
    if file_classes is not None and num_classes is None:  # nobody said: the file knows
        model = build_model(arch, num_classes=file_classes, **options)
    elif file_classes is not None:
        raise GraftkdError(
            f"{path} predicts {file_classes} classes but the data has {num_classes}: use a teacher trained on "
            f"this data (or pass --num-classes {file_classes} if the data really has {file_classes} classes)"
        )
    load_into(model, sd, source=str(path))
    model.float().eval()

    mean, std = default_normalization(key)
    meta: dict[str, Any] = {
        "arch": key,
        "source": str(path),
        "mean": tuple(float(v) for v in extras.get("mean", mean)),
        "std": tuple(float(v) for v in extras.get("std", std)),
    }
    if extras.get("classes") is not None:
        meta["classes"] = list(extras["classes"])
    if options:
        meta["arch_options"] = options
    for acc_key in ("test_acc", "best_prec1"):
        if extras.get(acc_key) is not None:
            meta["reported_acc"] = float(extras[acc_key])
            break
    return model, meta
