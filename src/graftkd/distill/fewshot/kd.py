"""KD (Hinton et al. 2015) on the few unlabeled images: soft targets only, labels never used."""
from __future__ import annotations

from graftkd.distill.fewshot.inherit import inherit_blocks
from graftkd.distill.base import LossMethod, LossStage, register_method
from graftkd.distill.losses import kd_loss


@register_method("kd")
class KD(LossMethod):
    defaults = {"temperature": 4.0}

    def setup(self, task) -> None:
        self.frozen, self.facts = inherit_blocks(task)

    def stages(self, task) -> list[LossStage]:
        return [LossStage("kd", task.epochs, task.lr, [task.student])]

    def loss(self, stage, student_logits, teacher_logits, student_features, teacher_features):
        return {"kd": kd_loss(student_logits, teacher_logits, self.options["temperature"])}
