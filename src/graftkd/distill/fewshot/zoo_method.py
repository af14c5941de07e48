"""Any zoo feature distiller (AT, PKT, RKD, CRD, ...) as a few-shot method: KD on the logits plus the
distiller's loss at its spots, trained in the one loop like every other method (``--method zoo``).

Options: ``distiller`` (a name ``graftkd.distill.zoo.list_distillers`` lists), ``beta`` (its weight; None:
the distiller's benchmark default), ``temperature`` (KD's). Distillers with pre-training stages (AB, FSP,
FT) are refused: their stages use their own optimiser, which the few-shot loop does not run.
"""
from __future__ import annotations

from torch import nn

from graftkd.distill.fewshot.inherit import inherit_blocks
from graftkd.distill.base import LossMethod, LossStage, register_method
from graftkd.distill.fulldata import spot_distiller
from graftkd.distill.losses import kd_loss
from graftkd.distill.zoo import distiller_class
from graftkd.errors import GraftkdError


@register_method("zoo")
class ZooDistiller(LossMethod):
    defaults = {"distiller": "at", "beta": None, "temperature": 4.0}

    def __init__(self, **options) -> None:
        super().__init__(**options)
        distiller_class(self.options["distiller"])  # an unknown name fails before any work, naming close ones

    def setup(self, task) -> None:
        self.frozen, self.facts = inherit_blocks(task)
        sample = task.normalize(task.images[:2]).float()
        self.distiller, self.s_paths, self.t_paths = spot_distiller(self.options["distiller"], task.student,
                                                                    task.teacher, sample)
        if self.distiller.init_stages():
            raise GraftkdError(f"distiller '{self.options['distiller']}' has pre-training stages, which the few-shot "
                               "loop does not run: use it with `graftkd train-kd`, or pick another distiller")
        beta = self.options["beta"]
        self.beta = float(beta) if beta is not None else float(type(self.distiller).weight)

    def extra_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"distiller": self.distiller})

    def stages(self, task) -> list[LossStage]:
        return [LossStage(f"kd+{self.options['distiller']}", task.epochs, task.lr,
                          [task.student, *self.distiller.student_modules()])]

    def teacher_paths(self, stage) -> list[str]:
        return self.t_paths

    def student_paths(self, stage) -> list[str]:
        return self.s_paths

    def loss(self, stage, student_logits, teacher_logits, student_features, teacher_features):
        distilled = self.distiller([student_features[p] for p in self.s_paths],
                                   [teacher_features[p] for p in self.t_paths])
        return {"kd": kd_loss(student_logits, teacher_logits, self.options["temperature"]),
                self.options["distiller"]: self.beta * distilled}
