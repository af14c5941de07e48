"""Dropped units (and channels) faded out while the student trains, instead of cut out before the first step.

A depth derivation keeps some of the teacher's units and drops the rest. Cutting them at once leaves a
student far from its teacher (ResNet-56 -> ResNet-20: 34 % on the validation split before any step). Here
the student starts as the whole teacher, and every unit the derivation drops is blended out,
``y = x + a (unit(x) - x)``, with ``a`` going linearly from 1 to 0 over the first ``steps`` training
forwards. A dropped unit keeps its input's shape (that is why it could be dropped), so at ``a = 0`` it is
the identity and is skipped; from then on the model computes exactly the derived student, whose weights
:meth:`FadingStudent.student_state_dict` hands back under the plain student's keys.

A width derivation keeps some channels of every narrowed layer: :class:`NarrowingStudent` fades the dropped
channels the same way, then trains the narrow student itself on slices of the same parameters.

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


def _fade_dropped_units(net: nn.Module, plan: DepthPlan, owner: nn.Module) -> list[str]:
    """Wrap every unit of ``net`` that ``plan`` drops in :class:`_Faded` (weighted by ``owner.alpha``); their paths."""
    faded = []
    for path, chosen in plan.selections.items():
        container = net.get_submodule(path) if path else net
        for i in range(plan.lengths[path]):
            if i not in chosen:
                container[i] = _Faded(container[i], owner)
                faded.append(f"{path}.{i}" if path else str(i))
    return faded


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
        self.faded = _fade_dropped_units(self.net, plan, self)

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


class _Kept(torch.autograd.Function):
    """``value[rows][:, columns]``, its gradient written by one ``index_put_`` into zeros of the full shape
    (autograd's own backward of the two ``index_select`` calls goes through an intermediate tensor and
    scatters along dim 1). The values and gradients are those of ``index_select`` (tested)."""

    @staticmethod
    def forward(ctx, value, rows, columns):
        ctx.shape, ctx.rows, ctx.columns = value.shape, rows, columns
        kept = value if rows is None else value.index_select(0, rows)
        return kept if columns is None else kept.index_select(1, columns)

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros(ctx.shape)
        if ctx.rows is not None and ctx.columns is not None:
            full.index_put_((ctx.rows[:, None], ctx.columns[None, :]), grad)
        elif ctx.rows is not None:
            full.index_copy_(0, ctx.rows, grad)
        else:
            full.index_copy_(1, ctx.columns, grad)
        return full, None, None


def _student_path(key: str) -> tuple[str, str]:
    module, _, name = key.rpartition(".")
    return module, name


class NarrowingStudent(nn.Module):
    """The whole teacher, its dropped channels (and any dropped units) fading out, then the narrow student itself.

    A width derivation keeps some channels of every narrowed layer. Here every layer that reads a narrowed
    channel space (a conv or linear whose student copy keeps fewer input channels) sees the dropped ones
    scaled by ``a``, going linearly from 1 to 0 over ``steps`` training forwards. Only such layers mix
    channels (norms, activations, pooling and residual sums work channel by channel), so at ``a = 0`` the
    model computes exactly the narrow student. From then on the forward *is* the narrow student: the plain
    student module called with the kept slices of the full parameters (``torch.func.functional_call``), so the
    rest of the run costs what the student costs, while the optimiser keeps stepping the same parameter
    objects (their momentum carries over) and the kept BatchNorm statistics move to the student's buffers.
    Units a depth derivation drops fade out as in :class:`FadingStudent`.

    ``taps`` (student module path -> the teacher channels kept there, None for all) are feature spots for a
    feature loss: ``taps.<i>`` receives the kept channels of the output at the i-th path in both phases, so one
    loss pairs them with the teacher's (``tap_channels``: the kept channels by tap name)."""

    eager_only = FadingStudent.eager_only

    def __init__(self, teacher: nn.Module, student: nn.Module, record, steps: int,
                 taps: dict[str, torch.Tensor | None] | None = None) -> None:
        super().__init__()
        depth, width = record.depth, record.width
        self.net = copy.deepcopy(teacher)
        for p in self.net.parameters():
            p.requires_grad_(True)
        self.narrow = copy.deepcopy(student)  # the student's layout only: its parameters come from ``net``
        for p in self.narrow.parameters():
            p.requires_grad_(False)
        self.steps = max(1, int(steps))
        self.seen = 0
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))
        # 1 once the kept statistics have moved to ``narrow`` (the first forward at a = 0): resumes alike
        self.register_buffer("switched", torch.zeros((), dtype=torch.long))
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync())
        to_teacher = depth.teacher_path if depth is not None else (lambda path: path)
        self.faded = _fade_dropped_units(self.net, depth, self) if depth is not None else []
        # student key -> (teacher key, kept output rows, kept input columns)
        layers = {la.path: la for la in width.layers}
        self._slices: dict[str, tuple[str, torch.Tensor | None, torch.Tensor | None]] = {}
        for key in self.narrow.state_dict():
            module, name = _student_path(key)
            out_keep = in_keep = None
            if module in layers and name in ("weight", "bias"):
                la = layers[module]
                out_keep = la.out_keep if len(la.out_keep) < la.teacher_out else None
                in_keep = la.in_keep if name == "weight" and len(la.in_keep) < la.teacher_in else None
            elif (module in width.norms and name in ("weight", "bias", "running_mean", "running_var")
                  and len(width.norms[module]) < self.net.get_submodule(to_teacher(module)).num_features):
                out_keep = width.norms[module]
            self._slices[key] = (f"{to_teacher(module)}.{name}" if module else name, out_keep, in_keep)
        # the fading: every layer reading a narrowed space sees its dropped input channels times ``a``
        self.readers: list[str] = []
        for la in width.layers:
            if len(la.in_keep) < la.teacher_in:
                path = to_teacher(la.path)
                mask = torch.zeros(la.teacher_in)
                mask[la.in_keep] = 1.0
                self.net.get_submodule(path).register_forward_pre_hook(self._fader(mask))
                self.readers.append(path)
        # feature spots: ``taps.<i>`` sees the kept channels at ``taps[i]``; ``tap_channels`` names the teacher's
        self.taps = nn.ModuleDict()
        self.tap_channels: dict[str, torch.Tensor] = {}
        for i, (path, keep) in enumerate((taps or {}).items()):
            self.taps[str(i)] = nn.Identity()
            self.net.get_submodule(to_teacher(path)).register_forward_hook(self._tap(str(i), keep))
            self.narrow.get_submodule(path).register_forward_hook(self._tap(str(i), None))
            if keep is not None:
                self.tap_channels[f"taps.{i}"] = keep
        self._param_keys = [key for key, _ in self.narrow.named_parameters()]

    def _fader(self, mask: torch.Tensor):
        def hook(module, inputs):
            alpha = self.alpha
            if alpha >= 1.0:
                return None
            x = inputs[0]
            scale = mask.to(device=x.device, dtype=x.dtype)
            scale = scale + alpha * (1.0 - scale)
            shape = [1, -1] + [1] * (x.dim() - 2)
            return (x * scale.view(shape),) + tuple(inputs[1:])
        return hook

    def _tap(self, name: str, keep: torch.Tensor | None):
        def hook(module, inputs, output):
            self.taps[name](output.index_select(1, keep.to(output.device)) if keep is not None else output)
        return hook

    @property
    def alpha(self) -> float:
        return max(0.0, 1.0 - self.seen / self.steps)

    def _kept(self, key: str, source: dict[str, torch.Tensor]) -> torch.Tensor:
        teacher_key, out_keep, in_keep = self._slices[key]
        value = source[teacher_key]
        if out_keep is None and in_keep is None:
            return value
        return _Kept.apply(value, None if out_keep is None else out_keep.to(value.device),
                           None if in_keep is None else in_keep.to(value.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.seen += 1
            self.trained_steps.add_(1)
        if self.alpha > 0.0:
            return self.net(x)
        if not int(self.switched):
            self._move_statistics()
        own = dict(self.net.named_parameters())
        params = {key: self._kept(key, own) for key in self._param_keys}
        return torch.func.functional_call(self.narrow, params, (x,))

    @torch.no_grad()
    def _move_statistics(self) -> None:
        own = dict(self.net.named_buffers())
        for key, buffer in self.narrow.named_buffers():
            buffer.copy_(self._kept(key, own))
        self.switched.fill_(1)

    def _sync(self) -> None:
        self.seen = int(self.trained_steps)

    @torch.no_grad()
    def student_state_dict(self, student: nn.Module) -> dict[str, torch.Tensor]:
        """The kept slices of the trained weights, under ``student``'s keys (strict)."""
        params = dict(self.net.named_parameters())
        buffers = dict(self.narrow.named_buffers()) if int(self.switched) else dict(self.net.named_buffers())
        state = {}
        for key in student.state_dict():
            if key in self._param_keys:
                state[key] = self._kept(key, params).detach().clone()
            elif int(self.switched):
                state[key] = buffers[key].detach().clone()
            else:
                state[key] = self._kept(key, buffers).detach().clone()
        return state
