"""Spot-adaptive KD (Song et al., TIP 2022): a policy decides, per sample and per spot, where to distil.

The pieces, as in the spec (docs: ../shared/design/sakd.md):

- **Policy**: one ``nn.Linear`` over the concatenated, detached pooled embeddings of teacher and student
  (from this iteration's normal forward), two logits per decision, K = spots + 1 decisions (the logits
  are the last spot). Decisions are sampled with a straight-through Gumbel-softmax at tau = 5: the
  forward value is one-hot, the gradient that of the soft sample. Same-family pairs start with +10 on
  every "distil" logit (done under ``no_grad``: the reference's in-place edit of a leaf fails under
  autograd), i.e. from standard fixed-spot distillation.
- **Routing network**: both nets run segment by segment between spots; at each spot the sample
  continues in the teacher's stream (decision 1) or the student's (0), crossing nets through 1x1/linear
  adapters (H: student->teacher, A: teacher->student). Its cross-entropy trains only the policy and
  the adapters (the *agent*): the student's weights are switched to ``requires_grad=False`` for this
  pass, so no gradient is computed for them at all (the reference computed and then discarded it).
- **Agent loss**: w * CE(z_route, y) + max(0, B/2 - sum of output decisions), w = gamma when the routed
  CE exceeds the student's own CE, 1/gamma when below, 1 when equal. The hinge is in raw sample counts,
  as published (it keeps at least half the batch on the teacher's logits).
- **Student loss**: CE + alpha * (n_out/B) * KD on the samples routed to the teacher at the output +
  beta * sum_k (n_k/B) * D_k on each spot's own sub-batch; masks are the detached hard decisions.
  ``anti`` inverts every mask (the ablation). A spot with no selected sample contributes 0 — also for
  FT, where the reference fell back to the full batch.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from graftkd.engine.runtime import autocast
from graftkd.errors import GraftkdError


def same_family(teacher_arch: str, student_arch: str) -> bool:
    """The spec's "homo" pairs: names equal once digits are dropped (resnet56/resnet20, resnet32x4/resnet8x4)."""
    def family(name: str) -> str:
        return re.sub(r"\d+", "", name.lower()).removesuffix("_b")

    return family(teacher_arch) == family(student_arch)


def gumbel_straight_through(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None
                            ) -> torch.Tensor:
    """One-hot samples over the last axis with the gradient of the tempered soft sample."""
    uniform = torch.rand(logits.shape, generator=generator, device=generator.device if generator else logits.device)
    uniform = uniform.to(logits.device, logits.dtype)
    gumbel = -torch.log(-torch.log(uniform + 1e-20) + 1e-20)
    soft = F.softmax((logits + gumbel) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())  # exactly one-hot forward, gradient of the soft sample


class SpotPolicy(nn.Module):
    def __init__(self, teacher_dim: int, student_dim: int, decisions: int, homo: bool) -> None:
        super().__init__()
        self.decisions = decisions
        self.linear = nn.Linear(teacher_dim + student_dim, 2 * decisions)
        if homo:
            with torch.no_grad():  # index 0 of each pair = the teacher path ("distil here")
                self.linear.bias[0::2] += 10.0

    def forward(self, teacher_embedding: torch.Tensor, student_embedding: torch.Tensor) -> torch.Tensor:
        features = torch.cat([teacher_embedding.detach(), student_embedding.detach()], dim=1)
        return self.linear(features).view(-1, self.decisions, 2)


def _adapter(source: tuple[int, ...], target: tuple[int, ...]) -> nn.Module:
    from graftkd.distill.zoo._layers import ConvReg

    if len(source) == 1 and len(target) == 1:
        return nn.Linear(source[0], target[0])
    if len(source) == 3 and len(target) == 3:
        return ConvReg(source, target)
    raise GraftkdError(f"cannot route between a feature of shape {source} and one of shape {target}")


class _Switch(torch.autograd.Function):
    """``a * t + (1 - a) * h`` for a per-sample ``a`` in {0, 1} (the straight-through decisions), in one pass and in
    the streams' own dtype.

    As products with the fp32 decisions, a bf16 run's streams would be promoted to fp32, and every teacher and
    student segment after a spot would run its first layers in fp32 and cast again. The values are the same: the
    output is ``t`` or ``h`` exactly, their gradients are the incoming one or zero, and the decisions' gradient
    is sum(g * t) - sum(g * h) over each sample, accumulated in fp32 as the products' was."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        mask = (a > 0.5).view(-1, *([1] * (t.dim() - 1)))
        ctx.save_for_backward(mask, t, h)
        ctx.a_dtype = a.dtype
        return torch.where(mask, t, h)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        mask, t, h = ctx.saved_tensors
        grad_a = grad_t = grad_h = None
        dims = tuple(range(1, t.dim()))
        if ctx.needs_input_grad[0]:
            grad_a = ((g * t).sum(dims, dtype=torch.float32) - (g * h).sum(dims, dtype=torch.float32)).to(ctx.a_dtype)
        zero = g.new_zeros(())
        if ctx.needs_input_grad[1]:
            grad_t = torch.where(mask, g, zero).to(t.dtype)
        if ctx.needs_input_grad[2]:
            grad_h = torch.where(mask, zero, g).to(h.dtype)
        return grad_a, grad_t, grad_h


def switch(a: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per sample, ``t`` where ``a`` is 1 and ``h`` where it is 0, with ``a``'s straight-through gradient
    (see ``_Switch``). ``a``: (B,), exactly 0 or 1 in value; ``t``, ``h``: (B, ...) of one shape (of two dtypes,
    ``torch.where`` promotes, and each gradient is cast back to its input's)."""
    return _Switch.apply(a, t, h)


class RoutingNetwork(nn.Module):
    """Multi-path network through teacher and student segments, switched per sample at each spot."""

    def __init__(self, spots: list[tuple[int, int]], student_shapes: list[tuple[int, ...]],
                 teacher_shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.spots = spots
        self.hint = nn.ModuleList([_adapter(s, t) for s, t in zip(student_shapes, teacher_shapes)])
        self.anti_hint = nn.ModuleList([_adapter(t, s) for s, t in zip(student_shapes, teacher_shapes)])

    def forward(self, x: torch.Tensor, student: nn.Module, teacher: nn.Module, decisions: torch.Tensor,
                teacher_first: torch.Tensor | None = None) -> torch.Tensor:
        """``decisions``: (B, K) in {0, 1} with straight-through gradients; 1 = the teacher's stream.
        ``teacher_first``: the frozen teacher's output at the first spot on ``x``, when the caller has it from
        its own teacher pass in the same precision: nothing upstream of it trains, so it is the same tensor."""
        u_s = u_t = x
        s_prev = t_prev = -1
        for k, (si, ti) in enumerate(self.spots):
            s_k = student.run_stages(u_s, s_prev + 1, si)
            t_k = teacher_first if (k == 0 and teacher_first is not None) else teacher.run_stages(u_t, t_prev + 1, ti)
            u_t = switch(decisions[:, k], t_k, self.hint[k](s_k))
            u_s = switch(decisions[:, k], self.anti_hint[k](t_k), s_k)
            s_prev, t_prev = si, ti
        s_last = student.run_stages(u_s, s_prev + 1, len(student.stage_parts()) - 1)
        t_last = teacher.run_stages(u_t, t_prev + 1, len(teacher.stage_parts()) - 1)
        a = decisions[:, -1:]  # fp32, whatever the segments ran in: the policy's gradient passes through it
        return a * t_last.float() + (1 - a) * s_last.float()


class SpotAdaptive(nn.Module):
    """The agent (policy + routing adapters) and the masking of the student's losses."""

    def __init__(self, spots: list[tuple[int, int]], student_shapes, teacher_shapes, student_dim: int,
                 teacher_dim: int, homo: bool, tau: float = 5.0, gamma: float = 1.0, anti: bool = False,
                 first_teacher_spot: int | None = None) -> None:
        super().__init__()
        self.policy = SpotPolicy(teacher_dim, student_dim, len(spots) + 1, homo)
        self.router = RoutingNetwork(spots, student_shapes, teacher_shapes)
        self.tau, self.gamma, self.anti = tau, gamma, anti
        # where the routing pass's first teacher segment can be read from the step's own teacher taps (an index
        # into them); None: the routing pass computes it
        self.first_teacher_spot = first_teacher_spot

    def agent_step(self, x: torch.Tensor, y: torch.Tensor, student: nn.Module, teacher: nn.Module,
                   student_logits: torch.Tensor, student_embedding: torch.Tensor, teacher_embedding: torch.Tensor,
                   generator: torch.Generator | None = None, teacher_first: torch.Tensor | None = None,
                   route: bool = True, precision: str = "fp32") -> tuple[torch.Tensor | None, torch.Tensor]:
        """(agent loss, detached hard decisions (B, K) as bool: True = distil at that spot).

        The routing pass runs in ``precision`` (the step's: bf16 autocast where the step has it); the policy, its
        Gumbel draw and the losses stay in fp32.

        ``route=False``: only the decisions (the policy's forward and its Gumbel draw, the same draw as a
        routed step); no routing pass and no agent loss (None), for steps where the agent does not update."""
        decisions = gumbel_straight_through(self.policy(teacher_embedding, student_embedding), self.tau, generator)
        teacher_path = decisions[..., 0]  # (B, K)
        if not route:
            masks = teacher_path.detach() > 0.5
            return None, ~masks if self.anti else masks
        was_training = student.training
        grads = [p.requires_grad for p in student.parameters()]
        student.eval()  # as the reference: BN running statistics, not this batch's
        for p in student.parameters():
            p.requires_grad_(False)  # gradients flow through the student's activations, never to its weights
        try:
            with autocast(x.device, precision):
                routed = self.router(x, student, teacher, teacher_path, teacher_first)
        finally:
            for p, flag in zip(student.parameters(), grads):
                p.requires_grad_(flag)
            student.train(was_training)
        routed_ce = F.cross_entropy(routed, y)
        student_ce = F.cross_entropy(student_logits.detach(), y)
        weight = torch.where(routed_ce.detach() > student_ce, torch.tensor(self.gamma, device=routed_ce.device),
                             torch.where(routed_ce.detach() < student_ce,
                                         torch.tensor(1.0 / self.gamma, device=routed_ce.device),
                                         torch.tensor(1.0, device=routed_ce.device)))
        hinge = F.relu(len(y) / 2 - teacher_path[:, -1].sum())
        masks = teacher_path.detach() > 0.5
        if self.anti:
            masks = ~masks
        return weight * routed_ce + hinge, masks


def masked_student_terms(masks: torch.Tensor, distiller, beta: float, alpha: float, temperature: float,
                         student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]) -> dict:
    """KD and distiller terms, each on its spot's selected samples and scaled by n_k / B.

    Spot k's distiller loss is entry k of ``spot_losses`` on that spot's sub-batch (FSP: the pair that
    ends at routing spot k). KD is per-sample KL masked and summed over B, which equals batchmean over
    the selected samples times n/B, with no host synchronisation.
    """
    batch = len(student_logits)
    terms: dict[str, torch.Tensor] = {}
    if alpha > 0:
        t = float(temperature)
        per_sample = F.kl_div(F.log_softmax(student_logits.float() / t, dim=1),
                              F.log_softmax(teacher_logits.float() / t, dim=1), reduction="none",
                              log_target=True).sum(dim=1)
        terms["kd"] = alpha * (per_sample * masks[:, -1]).sum() / batch * (t * t)
    if distiller is not None:
        total = student_logits.sum() * 0
        for k in range(masks.shape[1] - 1):
            selected = masks[:, k]
            n_k = int(selected.sum())  # the sub-batch has a data-dependent size: one sync per spot
            if n_k == 0:
                continue  # nothing distilled here (also for FT: no full-batch fallback)
            losses = distiller.spot_losses([f[selected] for f in student_features],
                                           [f[selected] for f in teacher_features])
            total = total + losses[k] * (n_k / batch)
        terms[distiller.name] = beta * total
    return terms
