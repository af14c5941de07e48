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
from typing import Any, ClassVar

import torch
from torch import nn

from graftkd.engine.loop import MethodOutcome, run_loss_method
from graftkd.engine.task import FewShotTask, LossStage
from graftkd.errors import GraftkdError

__all__ = ["FewShotTask", "LossStage", "MethodOutcome", "FewShotMethod", "LossMethod", "register_method",
           "build_method", "check_recipe", "list_methods", "recipe_methods"]


class FewShotMethod:
    """Base class. Subclasses set ``name``, declare options as dataclass-style class attributes in
    ``defaults`` and implement :meth:`run`."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    #: True when the method's student is not the requested zoo student (e.g. FSKD prunes the teacher)
    own_student: ClassVar[bool] = False
    #: True when the shared loop trains the requested student itself, so that the patient recipe (sample budget,
    #: mixing, EMA, BatchNorm recalibration of that student) applies; False for closed-form methods, grafting's own
    #: stages, and methods whose student only exists after a merge
    takes_recipe: ClassVar[bool] = False

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


class LossMethod(FewShotMethod):
    """A method defined by its stages and its loss; :mod:`graftkd.engine.loop` runs it.

    ``setup`` may set ``frozen`` (student modules the loop keeps in eval mode: inherited teacher blocks) and
    ``facts`` (a dict the loop adds to the run's record in result.json)."""

    takes_recipe: ClassVar[bool] = True

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


def recipe_methods() -> list[str]:
    """The registered methods the patient recipe applies to (:attr:`FewShotMethod.takes_recipe`)."""
    _load_builtin_methods()
    return sorted(name for name, cls in METHODS.items() if cls.takes_recipe)


def check_recipe(method: FewShotMethod) -> None:
    """Refuse the patient recipe for a method it cannot apply to, naming those it can."""
    if not method.takes_recipe:
        raise GraftkdError(f"--recipe patient needs a method that trains its student in the shared loop "
                           f"({', '.join(recipe_methods())}); '{method.name}' is not one of them: use --recipe paper")


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

    import graftkd.distill.fewshot as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"graftkd.distill.fewshot.{info.name}")
