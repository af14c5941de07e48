"""Dropped units faded out while the student trains, instead of cut out before the first step.

A depth derivation keeps some of the teacher's units and drops the rest. Cutting them at once leaves a
student far from its teacher (ResNet-56 -> ResNet-20: 34 % on the validation split before any step). Here
the student starts as the whole teacher, and every unit the derivation drops is blended out,
``y = x + a (unit(x) - x)``, with ``a`` going linearly from 1 to 0 over the first ``steps`` training
forwards. A dropped unit keeps its input's shape (that is why it could be dropped), so at ``a = 0`` it is
the identity and is skipped; from then on the model computes exactly the derived student, whose weights
:meth:`FadingStudent.student_state_dict` hands back under the plain student's keys.

The count of training forwards is a buffer: it travels with ``state_dict`` (checkpoints, resume, the loop's
timing probe that puts the state back), so a resumed run fades on the same schedule. A Python mirror of it
is what the forward reads, so no step waits on the device.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from graftkd.derive.depth import DepthPlan


class _Faded(nn.Module):
    """A dropped unit, weighted by its owner's current ``alpha``; skipped once that reaches 0."""

    def __init__(self, unit: nn.Module, owner: "FadingStudent") -> None:
        super().__init__()
        self.unit = unit
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (no cycle in modules())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self._owner[0].alpha
        if alpha <= 0.0:
            return x
        return x + alpha * (self.unit(x) - x)


class FadingStudent(nn.Module):
    """The teacher at full depth, its dropped units (``plan``) fading out over ``steps`` training forwards."""

    #: read by the training loop: the units' weight is a Python number that changes every step, which would make
    #: torch.compile trace the student again at every step
    eager_only = "the dropped units fade out step by step (a new weight every step would recompile the student)"

    def __init__(self, teacher: nn.Module, plan: DepthPlan, steps: int) -> None:
        super().__init__()
        self.net = copy.deepcopy(teacher)
        for p in self.net.parameters():
            p.requires_grad_(True)
        self.plan = plan
        self.steps = max(1, int(steps))
        self.seen = 0
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync())
        self.faded: list[str] = []
        for path, chosen in plan.selections.items():
            container = self.net.get_submodule(path) if path else self.net
            for i in range(plan.lengths[path]):
                if i not in chosen:
                    container[i] = _Faded(container[i], self)
                    self.faded.append(f"{path}.{i}" if path else str(i))

    @property
    def alpha(self) -> float:
        """The dropped units' weight at the current step: 1 at the start, 0 from step ``steps`` on."""
        return max(0.0, 1.0 - self.seen / self.steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():  # a training step (not evaluation, not BN re-estimation)
            self.seen += 1
            self.trained_steps.add_(1)
        return self.net(x)

    def _sync(self) -> None:
        self.seen = int(self.trained_steps)

    def student_state_dict(self, student: nn.Module) -> dict[str, torch.Tensor]:
        """The kept units' weights (and everything outside the shortened containers) under ``student``'s keys."""
        own = self.net.state_dict()
        return {key: own[self.plan.teacher_path(key)].clone() for key in student.state_dict()}
