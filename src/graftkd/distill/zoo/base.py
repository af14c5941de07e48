"""The contract every feature distiller follows (FitNet, AT, SP, CC, VID, RKD, PKT, FT, AB, FSP, NST, CRD).

A distiller is an ``nn.Module`` that reads the student's and the teacher's *features* at its spots and
returns one loss per spot. Features are the stage outputs of a zoo model (``model.feature_paths()``,
taken with forward hooks): ``f_0`` the stem, ``f_1 .. f_{n-2}`` the stages, ``f_{n-1}`` the pooled,
flattened embedding. Which features a distiller reads is data (``spot_kind``), resolved by
:func:`resolve_spots`. Per-spot losses (not one sum) let spot-adaptive KD weight or mask each spot on
its own sub-batch; every distiller therefore accepts any batch size >= 1 (relational losses return a
zero that keeps the graph when a batch has fewer than 2 samples).

Everything a distiller trains (regressors, embeddings, connectors, translators) is a submodule, so it
goes to the student's optimiser through :meth:`Distiller.student_modules`. Pre-training stages (FT's
paraphraser, AB's and FSP's initialisation) are described as data by :meth:`Distiller.init_stages` and
run by the training loop, never by the distiller itself. The logit KD term (batchmean KL x T^2) is not
part of any distiller: the training loop adds it with its own weight.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from graftkd.errors import GraftkdError

Shape = tuple[int, ...]  # one feature's shape without the batch dimension: (C, H, W) or (D,)

SPOT_KINDS = ("hint", "last_conv", "embedding", "stages", "all")


def resolve_spots(kind: str, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """(student feature index, teacher feature index) pairs a distiller of ``spot_kind`` reads.

    ``hint``: f_2 (FitNet's middle hint); ``last_conv``: f_{n-2}; ``embedding``: f_{n-1}; ``stages``:
    f_1 .. f_R with R = min over both nets of (n - 2) (AT, NST, VID, AB); ``all``: f_0 .. f_R (FSP).
    Negative positions count from each net's own end, so nets of different depth pair their last stages.
    """
    n = min(n_student, n_teacher)
    if n < 3:
        raise GraftkdError(f"feature distillers need at least 3 features per net (stem, a stage, the embedding); got {n}")
    if kind == "hint":
        return [(min(2, n_student - 2), min(2, n_teacher - 2))]
    if kind == "last_conv":
        return [(n_student - 2, n_teacher - 2)]
    if kind == "embedding":
        return [(n_student - 1, n_teacher - 1)]
    if kind == "stages":
        return [(i, i) for i in range(1, n - 1)]
    if kind == "all":
        return [(i, i) for i in range(0, n - 1)]
    raise GraftkdError(f"unknown spot kind '{kind}': use one of {', '.join(SPOT_KINDS)}")


@dataclass
class InitStage:
    """A pre-training stage, as data: train ``modules`` for ``epochs`` on ``loss`` with SGD, then maybe freeze.

    ``loss(student_features, teacher_features) -> Tensor`` gets the features at the distiller's spots
    (teacher detached). ``train_student`` says whether the student's own weights train too (AB/FSP
    initialise the student; FT's paraphraser trains alone on teacher features).
    """

    name: str
    epochs: int
    modules: list[nn.Module]
    loss: Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]
    train_student: bool = False
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    freeze_after: list[nn.Module] = field(default_factory=list)


class Distiller(nn.Module):
    """Base class. Subclasses set ``name``, ``spot_kind``, ``weight`` and implement :meth:`spot_losses`."""

    name: ClassVar[str] = ""
    spot_kind: ClassVar[str] = "embedding"
    weight: ClassVar[float] = 1.0  # beta: the weight of this distiller's loss in the benchmark's configs

    def __init__(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        """``*_shapes``: the shapes at this distiller's spots, in spot order (see :func:`resolve_spots`)."""
        super().__init__()
        if len(student_shapes) != len(teacher_shapes) or not student_shapes:
            raise GraftkdError(f"{self.name}: {len(student_shapes)} student spots but {len(teacher_shapes)} teacher spots")
        self.student_shapes = [tuple(s) for s in student_shapes]
        self.teacher_shapes = [tuple(t) for t in teacher_shapes]

    def spot_losses(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        """One scalar loss per spot (unweighted: the loop multiplies by ``weight``). Teacher features arrive
        detached. Must work for any batch size >= 1 and keep the graph to the student's features."""
        raise NotImplementedError

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        """The sum over spots (the standard, fixed-spot distillation)."""
        return torch.stack(self.spot_losses(student, teacher)).sum()

    def student_modules(self) -> list[nn.Module]:
        """Extra modules trained with the student's optimiser (default: all of this distiller)."""
        return [self] if any(p.requires_grad for p in self.parameters()) else []

    def init_stages(self) -> list[InitStage]:
        """Pre-training stages to run before the main training (default: none)."""
        return []


DISTILLERS: dict[str, type[Distiller]] = {}


def register_distiller(name: str) -> Callable[[type[Distiller]], type[Distiller]]:
    def decorator(cls: type[Distiller]) -> type[Distiller]:
        if name in DISTILLERS and DISTILLERS[name] is not cls:
            raise ValueError(f"distiller '{name}' is registered twice")
        if cls.spot_kind not in SPOT_KINDS:
            raise ValueError(f"{cls.__name__}.spot_kind must be one of {SPOT_KINDS}")
        cls.name = name
        DISTILLERS[name] = cls
        return cls

    return decorator


def _discover() -> None:
    package = importlib.import_module("graftkd.distill.zoo")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"graftkd.distill.zoo.{info.name}")


def list_distillers() -> list[str]:
    _discover()
    return sorted(DISTILLERS)


def distiller_class(name: str) -> type[Distiller]:
    """The registered class for ``name``; an unknown name is a one-line error with the closest names."""
    _discover()
    cls = DISTILLERS.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, list(DISTILLERS), n=2)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise GraftkdError(f"unknown distiller '{name}'{hint}; available: {', '.join(sorted(DISTILLERS))}")
    return cls


def build_distiller(name: str, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape], **options) -> Distiller:
    """Instantiate a registered distiller; unknown names and options are one-line errors."""
    cls = distiller_class(name)
    try:
        return cls(student_shapes, teacher_shapes, **options)
    except TypeError as exc:
        raise GraftkdError(f"distiller '{name}': {exc}") from None
