"""Cross distillation (Bai et al., AAAI 2020), block by block on the grafting plan.

Layer-wise distillation fits each student layer on the teacher's input to that layer, so the errors of
the earlier student layers pile up at deployment; fitting it on the student's own input instead gives
a target that the teacher never computed from that input. Cross distillation mixes the two. Here the
unit is a grafting block: for each non-inherited block l, in order, scion l (the student block with its
1×1 adapters, teacher-shaped in and out) is trained alone with Adam on

    μ·MSE(scion_l(x_t), f_l(x_t)) + (1 − μ)·MSE(scion_l(x_s), f_l(x_t)),

where x_t is the teacher's input to block l and x_s the input produced by the student chain already
trained (scions 1..l−1, inherited blocks as the teacher's), both from the same augmented batch. The
last block (logits) uses the same plain MSE on logits. The recorded loss terms are the weighted ones. A term whose weight is 0 is not computed, and
when every earlier block is inherited x_s = x_t, so one pass suffices.

BatchNorm: both passes run the scion in train mode (batch statistics); the running statistics follow
x_s only (x_t when μ = 1), because x_s is what the block sees once deployed. Earlier scions and
inherited blocks run in eval mode.

Budget: ``task.epochs`` split evenly over the trained blocks (the first blocks take the remainder), so
the total number of optimisation steps equals the other methods'. Batches, augmentation and mixup are
the shared loop's, and so are checkpoints and resume: each trained block is one stage of
:mod:`graftkd.engine.loop`, this class supplies the step (``step_terms``) and the modes. At the end the
adapters are folded exactly (``plan.merge``) and the plain student is returned.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from dataclasses import replace

from graftkd.distill.base import FewShotTask, LossMethod, LossStage, MethodOutcome, register_method
from graftkd.engine.loop import run_loss_method
from graftkd.engine.runtime import autocast
from graftkd.errors import GraftkdError

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@register_method("cross")
class Cross(LossMethod):
    """Cross distillation (Bai et al., AAAI 2020): each block fitted on a mix of the teacher's and the student's input.

    Each trained block is one stage of the shared loop, which owns batches, optimiser, records and resume;
    this class owns the step (the block's two inputs and its target) and which modules train."""

    defaults = {"mu": 0.6}
    # the student is whole only after the scions merge, so the recipe's weight average and BatchNorm
    # recalibration of the student would act on blocks without their adapters
    takes_recipe = False

    def setup(self, task: FewShotTask) -> None:
        from graftkd.graft.plan import build_plan

        mu = float(self.options["mu"])
        if not 0.0 <= mu <= 1.0:
            raise GraftkdError(f"method 'cross' option mu must be in [0, 1], got {mu}")
        plan = build_plan(task.teacher, task.student, tuple(task.images.shape[1:]), inherit=task.inherit)
        trained = plan.block_stage_blocks()
        if not trained:
            raise GraftkdError("method 'cross' has no block to train: every block is inherited; use --inherit none")
        if task.epochs < len(trained):
            raise GraftkdError(
                f"method 'cross' needs at least one epoch per trained block: budget {task.epochs} < "
                f"{len(trained)} blocks ({', '.join(plan.names[i] for i in trained)}); raise the epochs"
            )
        self.mu, self.plan, self.trained, self.task = mu, plan, trained, task
        self.block_of: dict[str, int] = {}
        self.weights: dict[int, dict[str, float]] = {}
        for block in trained:
            self.block_of[plan.names[block]] = block
            same_input = all(j in plan.inherited for j in range(block))  # then x_s == x_t
            self.weights[block] = {"teacher_input": 1.0 if same_input else mu,
                                   "student_input": 0.0 if same_input else 1.0 - mu}

    def extra_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"scions": self.plan.scions})

    def stages(self, task: FewShotTask) -> list[LossStage]:
        share, remainder = divmod(task.epochs, len(self.trained))
        return [LossStage(self.plan.names[block], share + (1 if order < remainder else 0), task.lr,
                          [self.plan.scions[block]])
                for order, block in enumerate(self.trained)]

    def set_modes(self, stage: LossStage) -> None:
        """Only the scion being trained is in train mode; teacher, inherited and earlier blocks are frozen."""
        plan, block = self.plan, self.block_of[stage.name]
        plan.teacher.eval()
        plan.scions.eval()
        for i in plan.inherited:
            plan.student_blocks[i].eval()
        plan.scions[block].train()

    def step_terms(self, stage: LossStage, x: torch.Tensor) -> dict[str, torch.Tensor]:
        plan, task, block = self.plan, self.task, self.block_of[stage.name]
        weights = self.weights[block]
        scion = plan.scions[block]
        stats_from = "student_input" if weights["student_input"] > 0 else "teacher_input"
        with torch.no_grad(), autocast(task.device, task.precision):
            x_t = _chain(plan.teacher_blocks[:block], x)
            target = plan.teacher_blocks[block](x_t).float()
            x_s = None if weights["student_input"] <= 0 else _student_prefix(plan, block, x)
        terms = {}
        with autocast(task.device, task.precision):
            for key, source in (("teacher_input", x_t), ("student_input", x_s)):
                if weights[key] <= 0:
                    continue
                with _frozen_statistics(scion, key != stats_from):
                    terms[key] = weights[key] * F.mse_loss(scion(source).float(), target)
        return terms

    def run(self, task: FewShotTask) -> MethodOutcome:
        # a loss point per epoch (blocks train for a few epochs each); no evaluation mid-run: the student is
        # only whole after the merge
        task = replace(task, log_every=1, eval_every=0)
        outcome = run_loss_method(self, task)
        for record, block in zip(outcome.stages, self.trained):
            record.update(block=block + 1, mu=self.mu)
        probe = task.normalize(task.images[: min(len(task.images), 32)])
        difference = self.plan.merge(probe)
        task.student.eval()
        extra = {**outcome.extra, "mu": self.mu, "blocks": self.plan.describe(),
                 "inherited_blocks": [i + 1 for i in self.plan.inherited], "merge_max_abs_diff": difference,
                 "last_block_loss": "mse on logits"}
        return MethodOutcome(student=task.student, stages=outcome.stages, extra=extra)


def _chain(blocks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for module in blocks:
        x = module(x)
    return x


def _student_prefix(plan, block: int, x: torch.Tensor) -> torch.Tensor:
    """The input the student chain gives block ``block``: inherited blocks as the teacher's, others as scions."""
    for i in range(block):
        x = plan.teacher_blocks[i](x) if i in plan.inherited else plan.scions[i](x)
    return x


@contextlib.contextmanager
def _frozen_statistics(module: nn.Module, frozen: bool):
    """Batch statistics still normalise, but running statistics do not move (momentum 0) while frozen."""
    if not frozen:
        yield
        return
    norms = [m for m in module.modules() if isinstance(m, _NORMS) and m.track_running_stats and m.training]
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in norms]
    try:
        for m in norms:
            m.momentum = 0.0
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
