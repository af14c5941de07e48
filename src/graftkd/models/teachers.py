"""Loading pretrained teachers from files, with the input normalisation they were trained with."""
from __future__ import annotations

import os
from typing import Any

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


def load_pretrained(arch: str, path: str | os.PathLike, num_classes: int = 10) -> tuple[nn.Module, dict[str, Any]]:
    """Build zoo model ``arch`` and load ``path`` into it strictly.

    Returns ``(model, meta)``: the model in eval mode and float32; ``meta`` has ``mean``/``std`` (from the
    file when it has them, else the arch default), ``classes`` (when the file lists them), ``arch``,
    ``source`` and ``reported_acc`` (the file's ``test_acc``/``best_prec1`` when present).
    """
    model = build_model(arch, num_classes=num_classes)
    sd, extras = read_checkpoint(path)
    sd = strip_prefix(sd, "module.")  # akamaster files were saved from DataParallel
    key = arch.strip().lower()
    if key.startswith("vgg") and hasattr(model, "batch_norm"):
        has_bn = detect_vgg_batch_norm(sd)
        if has_bn != model.batch_norm:
            other = f"{key}_bn" if has_bn else key.removesuffix("_bn")
            kind = "with" if has_bn else "without"
            raise GraftkdError(f"{path} holds a VGG {kind} batch norm, unlike {key}; use --teacher-arch {other}")
        sd = from_netgraft_release(sd, batch_norm=has_bn)
    load_into(model, sd, source=str(path))
    model.float().eval()

    mean, std = default_normalization(key)
    meta: dict[str, Any] = {
        "arch": key,
        "source": str(path),
        "mean": tuple(float(v) for v in extras.get("mean", mean)),
        "std": tuple(float(v) for v in extras.get("std", std)),
    }
    if "classes" in extras:
        meta["classes"] = list(extras["classes"])
    for acc_key in ("test_acc", "best_prec1"):
        if acc_key in extras:
            meta["reported_acc"] = float(extras[acc_key])
            break
    return model, meta
