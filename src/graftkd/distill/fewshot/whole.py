""""Whole": the grafting loss (Eq. 7, normalised-logit MSE) on the whole student, end to end.

The paper's Figure 3 baseline: same loss, same data, same budget as grafting, but no block-wise stages.
"""
from __future__ import annotations

from graftkd.distill.fewshot.inherit import inherit_blocks
from graftkd.distill.base import LossMethod, LossStage, register_method
from graftkd.graft.loss import normalized_logit_loss


@register_method("whole")
class Whole(LossMethod):
    defaults: dict = {}

    def setup(self, task) -> None:
        self.frozen, self.facts = inherit_blocks(task)

    def stages(self, task) -> list[LossStage]:
        return [LossStage("whole", task.epochs, task.lr, [task.student])]

    def loss(self, stage, student_logits, teacher_logits, student_features, teacher_features):
        return {"graft": normalized_logit_loss(student_logits, teacher_logits)}
