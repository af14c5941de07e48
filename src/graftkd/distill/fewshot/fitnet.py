"""FitNet (Romero et al. 2015) on few shots: a hint stage, then KD.

Hint stage: the student up to its middle block, plus the FitNet distiller's regressor (a bias-free 1x1
conv), learns to reproduce the teacher's middle-block output (MSE). KD stage: the whole student with soft
targets. The budget is split by ``hint_fraction``; labels are never used. The hint and its regressor are
the zoo's FitNet (:mod:`graftkd.distill.zoo.fitnet`), the one the full-data benchmark trains jointly with KD.
"""
from __future__ import annotations

import torch
from torch import nn

from graftkd.distill.base import LossMethod, LossStage, register_method
from graftkd.distill.fewshot.inherit import block_output_path, inherit_blocks
from graftkd.distill.losses import kd_loss
from graftkd.distill.zoo import build_distiller
from graftkd.engine.hooks import FeatureTap


@register_method("fitnet")
class FitNet(LossMethod):
    defaults = {"temperature": 4.0, "hint_fraction": 0.3, "hint_block": -1}  # -1: the middle block

    def setup(self, task) -> None:
        self.frozen, self.facts = inherit_blocks(task)
        # the middle block of each model: a teacher of another family may have more (VGG16's 6 to ResNet-18's 4)
        chosen = self.options["hint_block"]
        index, teacher_index = (chosen if chosen >= 0 else (len(model.block_parts()) - 1) // 2
                                for model in (task.student, task.teacher))
        self.hint_index = index
        self.teacher_path = block_output_path(task.teacher, teacher_index)
        self.student_path = block_output_path(task.student, index)
        probe = torch.zeros((2, *task.images.shape[1:]), device=task.device)
        shapes = {role: _output_shape(model, path, probe)
                  for role, model, path in (("t", task.teacher, self.teacher_path), ("s", task.student, self.student_path))}
        # a bias-free 1x1 conv where the maps have one size (the paper grid's); RepDistiller's ConvReg otherwise
        regressor = "1x1" if shapes["s"][1:] == shapes["t"][1:] else "convreg"
        self.hint = build_distiller("fitnet", [shapes["s"]], [shapes["t"]], regressor=regressor).to(task.device)
        self.facts = {**self.facts, "hint": {"student": self.student_path, "teacher": self.teacher_path,
                                             "regressor": regressor}}
        self.regressor = self.hint.regressors[0]
        self._hint_modules = [p for parts in task.student.block_parts()[: index + 1] for p in parts]

    def extra_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"regressor": self.regressor})

    def stages(self, task) -> list[LossStage]:
        hint_epochs = max(1, round(task.epochs * self.options["hint_fraction"]))
        return [
            LossStage("hint", hint_epochs, task.lr, [*self._hint_modules, self.regressor]),
            LossStage("kd", max(1, task.epochs - hint_epochs), task.lr, [task.student]),
        ]

    def teacher_paths(self, stage) -> list[str]:
        return [self.teacher_path] if stage.name == "hint" else []

    def student_paths(self, stage) -> list[str]:
        return [self.student_path] if stage.name == "hint" else []

    def loss(self, stage, student_logits, teacher_logits, student_features, teacher_features):
        if stage.name == "hint":
            return {"hint": self.hint([student_features[self.student_path]], [teacher_features[self.teacher_path]])}
        return {"kd": kd_loss(student_logits, teacher_logits, self.options["temperature"])}


@torch.no_grad()
def _output_shape(model: nn.Module, path: str, probe: torch.Tensor) -> tuple[int, ...]:
    """Shape (without the batch) of the module at ``path`` on a dummy batch (eval mode: no BatchNorm statistics change)."""
    was_training = model.training
    model.eval()
    with FeatureTap(model, [path]) as tap:
        model(probe)
        shape = tuple(tap.features[path].shape[1:])
    model.train(was_training)
    return shape
