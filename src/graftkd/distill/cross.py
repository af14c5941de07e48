"""Cross distillation (Bai et al., AAAI 2020), block by block on the grafting plan.

Layer-wise distillation fits each student layer on the teacher's input to that layer, so the errors of
the earlier student layers pile up at deployment; fitting it on the student's own input instead gives
a target that the teacher never computed from that input. Cross distillation mixes the two. Here the
unit is a grafting block: for each non-inherited block l, in order, scion l (the student block with its
1×1 adapters, teacher-shaped in and out) is trained alone with Adam on

    μ·MSE(scion_l(x_t), f_l(x_t)) + (1 − μ)·MSE(scion_l(x_s), f_l(x_t)),

where x_t is the teacher's input to block l and x_s the input produced by the student chain already
trained (scions 1..l−1, inherited blocks as the teacher's), both from the same augmented batch. The
last block (logits) uses the same plain MSE on logits. A term whose weight is 0 is not computed, and
when every earlier block is inherited x_s = x_t, so one pass suffices.

BatchNorm: both passes run the scion in train mode (batch statistics); the running statistics follow
x_s only (x_t when μ = 1), because x_s is what the block sees once deployed. Earlier scions and
inherited blocks run in eval mode.

Budget: ``task.epochs`` split evenly over the trained blocks (the first blocks take the remainder), so
the total number of optimisation steps equals the other methods'. Batches, augmentation and mixup are
the shared loop's (:func:`few_shot_batches`, :func:`few_shot_input`). At the end the adapters are
folded exactly (``plan.merge``) and the plain student is returned. No checkpoints or resume: a stopped
run starts again from scratch.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from graftkd.distill.base import FewShotMethod, FewShotTask, MethodOutcome, register_method
from graftkd.engine.loop import few_shot_batches, few_shot_input
from graftkd.engine.runtime import Timer, autocast
from graftkd.errors import GraftkdError

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@register_method("cross")
class Cross(FewShotMethod):
    defaults = {"mu": 0.6}

    def run(self, task: FewShotTask) -> MethodOutcome:
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
        share, remainder = divmod(task.epochs, len(trained))
        timer = Timer(task.device)
        task.teacher.eval()
        records = []
        for order, block in enumerate(trained):
            epochs = share + (1 if order < remainder else 0)
            records.append(self._train_block(task, plan, block, epochs, mu))
        probe = task.normalize(task.images[: min(len(task.images), 32)])
        difference = plan.merge(probe)
        task.student.eval()
        extra = {"mu": mu, "blocks": plan.describe(), "inherited_blocks": [i + 1 for i in plan.inherited],
                 "merge_max_abs_diff": difference, "seconds": timer.elapsed(),
                 "last_block_loss": "mse on logits"}
        return MethodOutcome(student=task.student, stages=records, extra=extra)

    def _train_block(self, task: FewShotTask, plan, block: int, epochs: int, mu: float) -> dict:
        """Train scion ``block`` for ``epochs`` passes; return its stage record."""
        scion = plan.scions[block]
        params = [p for p in scion.parameters() if p.requires_grad]
        if not params:
            raise GraftkdError(f"block {block + 1} ('{plan.names[block]}') has nothing to train")
        optimizer = torch.optim.Adam(params, lr=task.lr, betas=(0.9, 0.999), weight_decay=0.0)
        same_input = all(j in plan.inherited for j in range(block))  # then x_s == x_t
        weights = {"teacher_input": 1.0 if same_input else mu, "student_input": 0.0 if same_input else 1.0 - mu}
        stats_from = "student_input" if weights["student_input"] > 0 else "teacher_input"
        record = {"name": plan.names[block], "kind": "cross", "block": block + 1, "epochs": epochs, "lr": task.lr,
                  "mu": mu, "steps": 0, "images": 0, "seconds": 0.0, "final_loss": float("nan"),
                  "loss_terms": {}, "loss_curve": []}
        timer = Timer(task.device)
        self._set_modes(plan, block)
        for epoch in range(epochs):
            running = {k: torch.zeros((), device=task.device) for k, w in weights.items() if w > 0}
            steps = 0
            for indices in few_shot_batches(len(task.images), task.batch_size, task.generator, task.device):
                x = few_shot_input(task, indices)
                with torch.no_grad(), autocast(task.device, task.precision):
                    x_t = _chain(plan.teacher_blocks[:block], x)
                    target = plan.teacher_blocks[block](x_t).float()
                    x_s = None if same_input else _student_prefix(plan, block, x)
                terms = {}
                with autocast(task.device, task.precision):
                    for key, source in (("teacher_input", x_t), ("student_input", x_s)):
                        if weights[key] <= 0:
                            continue
                        with _frozen_statistics(scion, key != stats_from):
                            terms[key] = F.mse_loss(scion(source).float(), target)
                loss = sum(weights[k] * v for k, v in terms.items())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for key, value in terms.items():
                    running[key] += value.detach()
                steps += 1
                record["images"] += len(indices)
            record["steps"] += steps
            means = {k: float(v) / max(steps, 1) for k, v in running.items()}  # one host sync per epoch
            total = sum(weights[k] * v for k, v in means.items())
            if not math.isfinite(total):
                raise GraftkdError(
                    f"loss became {total} in block {block + 1} ('{plan.names[block]}') of 'cross' at epoch "
                    f"{epoch + 1}: lower the learning rate"
                )
            record["final_loss"] = total
            record["loss_terms"] = means
            record["loss_curve"].append([epoch + 1, total])
        scion.eval()
        record["seconds"] = timer.elapsed()
        record["images_per_second"] = record["images"] / record["seconds"] if record["seconds"] > 0 else float("nan")
        return record

    @staticmethod
    def _set_modes(plan, block: int) -> None:
        """Only the scion being trained is in train mode; teacher, inherited and earlier blocks are frozen."""
        plan.teacher.eval()
        plan.scions.eval()
        for i in plan.inherited:
            plan.student_blocks[i].eval()
        plan.scions[block].train()


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
