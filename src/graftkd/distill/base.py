"""The few-shot method contract: one small class per method, registered by name.

Every method gets the same :class:`FewShotTask` (teacher, fresh student, the few-shot images, the
augmentation, the batch size and the epoch budget) and returns a :class:`MethodOutcome` whose
``student`` is a plain zoo student. Gradient methods subclass :class:`LossMethod` and only say what their
stages are and what their loss is; the loop (batches, augmentation, teacher pass, checkpoints, resume,
NaN guard, logging) lives in :mod:`graftkd.engine.loop` and is shared by all of them. Methods solved in
closed form (FSKD) or with their own stage structure (grafting) implement :meth:`FewShotMethod.run`.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from graftkd.engine.loop import MethodOutcome, run_loss_method
from graftkd.errors import GraftkdError

Augmenter = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class FewShotTask:
    """What every method receives; identical across methods within one grid cell."""

    teacher: nn.Module  # frozen, eval mode, on ``device``
    student: nn.Module  # a fresh zoo student on ``device`` (methods decide about inheriting teacher blocks)
    images: torch.Tensor  # uint8 (N, C, H, W) few-shot images, on ``device``; never any labels
    normalize: nn.Module  # uint8 -> normalised float, on ``device``
    device: torch.device
    generator: torch.Generator  # the only source of randomness for batches and augmentation
    batch_size: int
    epochs: int  # the budget: passes over the few-shot set (grafting's total across its stages)
    lr: float  # Adam learning rate for end-to-end methods, already scaled to ``batch_size``
    shots: int
    num_classes: int
    augment: Augmenter | None = None
    mixup: bool = False
    precision: str = "fp32"
    inherit: Any = "auto"  # the grafting inheritance spec; methods that copy teacher blocks honour it
    teacher_arch: str = ""
    student_arch: str = ""
    run_dir: Path | None = None  # checkpoints go here (resumable); None: no checkpoints
    checkpoint_every_s: float = 60.0
    log_every: int = 10
    progress: bool = True
    # optional: accuracy of a forward function on held-out data, for curves (never for selection)
    eval_hook: Callable[[Callable[[torch.Tensor], torch.Tensor]], float] | None = None
    eval_every: int = 0
    schedule: Any = None  # graftkd.graft.ScheduleConfig, for methods that follow grafting's stages
    seed: int = 0
    padding: int = 4  # the augmentation's settings, for methods that build their own (grafting)
    flip: bool = True
    recipe: Any = None  # graftkd.engine.recipe.Recipe for the patient recipe; None: the paper's (epochs, Adam)
    channels_last: bool = False  # the loop's memory format (the patient recipe with precision "auto" times it)
    speed: dict | None = None  # what the timing of the candidate settings found, when it ran
    average: Any = None  # the weight average the patient recipe keeps when it asks for one (engine.recipe.WeightAverage)
    world: Any = None  # graftkd.engine.distributed.World under torchrun (the loop shards each batch); None: one process


class FewShotMethod:
    """Base class. Subclasses set ``name``, declare options as dataclass-style class attributes in
    ``defaults`` and implement :meth:`run`."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    #: True when the method's student is not the requested zoo student (e.g. FSKD prunes the teacher)
    own_student: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "none"
            raise GraftkdError(f"method '{self.name}' has no option {', '.join(unknown)} (valid: {valid})")
        self.options = {**self.defaults, **options}
        for key, value in self.options.items():
            default = self.defaults[key]
            if default is not None and not isinstance(value, type(default)) and not (
                isinstance(default, float) and isinstance(value, int)
            ):
                raise GraftkdError(
                    f"method '{self.name}' option {key} must be {type(default).__name__}, got {value!r}"
                )

    def run(self, task: FewShotTask) -> MethodOutcome:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        return {"method": self.name, "options": dict(self.options)}


@dataclass
class LossStage:
    """One stage of a gradient method, as data: how long, how fast, what trains."""

    name: str
    epochs: int
    lr: float
    modules: list[nn.Module]  # what the optimiser updates in this stage (student and/or extra modules)
    train_student: bool = True  # student in train mode (BN statistics update) during this stage


class LossMethod(FewShotMethod):
    """A method defined by its stages and its loss; :mod:`graftkd.engine.loop` runs it."""

    def setup(self, task: FewShotTask) -> None:
        """Build extra modules (regressors, ...) once the task is known. Default: nothing."""

    def extra_modules(self) -> nn.ModuleDict:
        """Trainable modules that are not part of the student (checkpointed with it)."""
        return nn.ModuleDict()

    def stages(self, task: FewShotTask) -> list[LossStage]:  # pragma: no cover - abstract
        raise NotImplementedError

    def teacher_paths(self, stage: LossStage) -> list[str]:
        """Teacher module paths whose outputs :meth:`loss` needs (taken with forward hooks)."""
        return []

    def student_paths(self, stage: LossStage) -> list[str]:
        return []

    def loss(
        self,
        stage: LossStage,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        student_features: dict[str, torch.Tensor],
        teacher_features: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """Named loss terms; their sum is minimised."""
        raise NotImplementedError

    def run(self, task: FewShotTask) -> MethodOutcome:
        return run_loss_method(self, task)


METHODS: dict[str, type[FewShotMethod]] = {}


def register_method(name: str) -> Callable[[type[FewShotMethod]], type[FewShotMethod]]:
    """Class decorator: make a method available by ``name`` in configs and on the command line."""

    def add(cls: type[FewShotMethod]) -> type[FewShotMethod]:
        if name in METHODS:
            raise ValueError(f"method '{name}' is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return add


def list_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(METHODS)


def build_method(name: str, options: dict[str, Any] | None = None) -> FewShotMethod:
    """Instantiate a registered method; an unknown name is an error that names the closest ones."""
    _load_builtin_methods()
    key = name.strip().lower()
    if key not in METHODS:
        close = difflib.get_close_matches(key, list(METHODS), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise GraftkdError(f"unknown method '{name}'{hint}; available: {', '.join(sorted(METHODS))}")
    return METHODS[key](**(options or {}))


def _load_builtin_methods() -> None:
    import importlib
    import pkgutil

    import graftkd.distill as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in ("base",) and not info.name.startswith("_"):
            importlib.import_module(f"graftkd.distill.{info.name}")
