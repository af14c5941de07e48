"""Depth derivation: a student stage with fewer units than the teacher's takes a subset of the teacher's units.

Generic over module trees, not a table per architecture: the teacher and the student are walked in
parallel by child name. Where both hold an ``nn.Sequential`` (or ``nn.ModuleList``) and the student's is
shorter, its units are matched, in order, to a subset of the teacher's. A student unit may only take a
teacher unit of the same *structure* (module types, kernel sizes, strides, which optional parts exist;
widths are ignored here, they are the width derivation's business), so the strided, widening first unit
of a ResNet stage always comes from the teacher's first unit.

Rules (the record names the one used):

- ``even``: evenly spaced units, e.g. units 0, 4, 8 of a 9-unit ResNet-56 stage for ResNet-20;
- ``first``: the first units that fit;
- ``greedy``: PRACTISE's idea (Wang et al. 2023), data-driven: starting from the whole teacher, drop one
  unit at a time (replaced by the identity, so only shape-preserving units can go), each time the one
  whose removal changes the teacher's logits on the few-shot images least, until every stage has the
  student's count.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from graftkd.errors import UnsupportedPairing

DEPTH_RULES = ("even", "first", "greedy")
_CONTAINERS = (nn.Sequential, nn.ModuleList)


class Underivable(UnsupportedPairing):
    """The student (or a part of it) is not a sub-network of the teacher."""


def signature(module: nn.Module) -> tuple:
    """Structure of ``module`` without its widths: what must agree for a teacher unit to fit a student unit."""
    if isinstance(module, nn.Conv2d):
        own: tuple = ("Conv2d", module.kernel_size, module.stride, module.padding, module.dilation,
                      module.groups == 1, module.bias is not None, module.padding_mode)
    elif isinstance(module, nn.Linear):
        own = ("Linear", module.bias is not None)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        own = (type(module).__name__, module.eps, module.affine, module.track_running_stats)
    elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        own = (type(module).__name__, module.kernel_size, module.stride, module.padding)
    else:
        own = (type(module).__name__,)
    children = tuple((name, signature(child)) for name, child in module.named_children())
    if isinstance(module, _CONTAINERS):
        children = (len(module),) + children
    return own + children


@dataclass
class DepthPlan:
    """Which teacher units every shortened student container takes (teacher indices, in order)."""

    rule: str
    selections: dict[str, list[int]] = field(default_factory=dict)  # student container path -> teacher unit indices
    lengths: dict[str, int] = field(default_factory=dict)  # student container path -> teacher unit count

    def teacher_path(self, student_path: str) -> str:
        """The teacher module a student module path was taken from (``layer2.1.conv1`` -> ``layer2.4.conv1``)."""
        parts = student_path.split(".") if student_path else []
        mapped = list(parts)
        for depth in range(len(parts)):  # selections are keyed by student paths
            prefix = ".".join(parts[:depth])
            if prefix in self.selections and parts[depth].isdigit():
                mapped[depth] = str(self.selections[prefix][int(parts[depth])])
        return ".".join(mapped)


def _match_first(cands: list[list[int]], exclude: set[int] = frozenset()) -> list[int] | None:
    """Leftmost order-preserving assignment of student units to allowed teacher units, or None."""
    chosen, last = [], -1
    for allowed in cands:
        nxt = next((i for i in allowed if i > last and i not in exclude), None)
        if nxt is None:
            return None
        chosen.append(nxt)
        last = nxt
    return chosen


def _match_even(cands: list[list[int]], n: int) -> list[int] | None:
    """Order-preserving assignment closest (sum of |i - target|) to evenly spaced targets."""
    k = len(cands)
    targets = [0.0] if k == 1 else [j * (n - 1) / (k - 1) for j in range(k)]
    inf = float("inf")
    cost = [[inf] * n for _ in range(k)]
    back = [[-1] * n for _ in range(k)]
    for j in range(k):
        for i in cands[j]:
            here = abs(i - targets[j])
            if j == 0:
                cost[j][i] = here
                continue
            best, arg = inf, -1
            for p in range(i):
                if cost[j - 1][p] < best:
                    best, arg = cost[j - 1][p], p
            if arg >= 0:
                cost[j][i], back[j][i] = best + here, arg
    end = min(range(n), key=lambda i: (cost[k - 1][i], i))
    if cost[k - 1][end] == inf:
        return None
    chosen = [end]
    for j in range(k - 1, 0, -1):
        chosen.append(back[j][chosen[-1]])
    return chosen[::-1]


def _walk(teacher: nn.Module, student: nn.Module, prefix: str, out: list[tuple[str, nn.Module, nn.Module]]) -> None:
    """Collect every container pair whose student side is shorter; raise where the trees differ otherwise."""
    where = prefix or "the model"
    if isinstance(teacher, _CONTAINERS) and type(teacher) is type(student) and len(teacher) != len(student):
        if len(student) > len(teacher):
            raise Underivable(f"'{where}' has {len(student)} units in the student but {len(teacher)} in the teacher: "
                              "a derived student cannot be deeper than its teacher")
        out.append((prefix, teacher, student))
        return  # the units inside are walked once the selection is known
    if type(teacher) is not type(student):
        if not prefix:  # the whole models differ: another family, not a part
            raise Underivable(f"the student is a {type(student).__name__}, the teacher a {type(teacher).__name__}: "
                              "another model family")
        raise Underivable(f"'{where}' is a {type(student).__name__} in the student but a {type(teacher).__name__} "
                          "in the teacher")
    t_children, s_children = dict(teacher.named_children()), dict(student.named_children())
    if t_children.keys() != s_children.keys():
        only = sorted(set(t_children) ^ set(s_children))
        raise Underivable(f"'{where}' has different parts in teacher and student ({', '.join(only)})")
    for name in t_children:
        _walk(t_children[name], s_children[name], f"{prefix}.{name}" if prefix else name, out)


_NORMALISATIONS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)  # every kind, not only BatchNorm


def droppable(unit: nn.Module) -> bool:
    """Whether a teacher unit may be left out of the student. A unit is a block with weights of its own (a
    residual unit, a convolution). A normalisation layer, an activation, a pool or any other weightless layer
    is part of the function between units: leaving one out (a student without the teacher's BatchNorm) gives
    a network that is not a part of the teacher at all. An identity may go: leaving it out changes nothing."""
    if isinstance(unit, nn.Identity):
        return True
    if isinstance(unit, _NORMALISATIONS):
        return False
    return any(True for _ in unit.parameters()) or any(True for _ in unit.children())


def _check_kept(teacher: nn.Module, chosen: list[int], where: str) -> list[int]:
    """``chosen``, or :class:`Underivable` naming the first teacher unit it leaves out that may not be."""
    if chosen is None:
        return chosen
    left = next((i for i, unit in enumerate(teacher) if i not in chosen and not droppable(unit)), None)
    if left is not None:
        raise Underivable(f"'{where}': the student has no place for the teacher's {type(teacher[left]).__name__} "
                          f"(unit {left}); normalisation layers, activations and pools are never left out, so "
                          "the student is not a part of the teacher (another layer pattern, e.g. no BatchNorm)")
    return chosen


def _candidates(teacher: nn.Module, student: nn.Module, where: str) -> list[list[int]]:
    t_sigs = [signature(u) for u in teacher]
    cands = [[i for i, sig in enumerate(t_sigs) if sig == signature(u)] for u in student]
    if _match_first(cands) is None:
        raise Underivable(f"'{where}': no order-preserving choice of teacher units has the student units' structure")
    return cands


def plan_depth(teacher: nn.Module, student: nn.Module, rule: str = "even",
               logit_error: Callable[[nn.Module], float] | None = None) -> DepthPlan:
    """Choose the teacher units of every shortened student container (``rule``: even, first or greedy).

    ``greedy`` needs ``logit_error(model) -> float``: the few-shot logit error of a teacher copy.
    Raises :class:`Underivable` where the module trees differ in more than depth and width.
    """
    if rule not in DEPTH_RULES:
        raise Underivable(f"unknown depth rule '{rule}': use one of {', '.join(DEPTH_RULES)}")
    plan = DepthPlan(rule)
    pending = [("", teacher, student)]
    while pending:  # outer containers first, then the units they chose (nested containers)
        prefix, t, s = pending.pop(0)
        found: list[tuple[str, nn.Module, nn.Module]] = []
        _walk(t, s, prefix, found)
        if rule == "greedy" and found:
            if logit_error is None:
                raise Underivable("the greedy depth rule needs the few-shot images")
            _greedy(teacher, found, plan, logit_error)
        for path, t_seq, s_seq in found:
            cands = _candidates(t_seq, s_seq, path)
            if rule != "greedy":
                chosen = _match_first(cands) if rule == "first" else _match_even(cands, len(t_seq))
                plan.selections[path] = _check_kept(t_seq, chosen, path or "the model")
            plan.lengths[path] = len(t_seq)
            for j, i in enumerate(plan.selections[path]):
                pending.append((f"{path}.{j}", t_seq[i], s_seq[j]))
    return plan


class _Replay(nn.Module):
    """Stands in for a unit that runs before the one being tried: returns the unit's recorded outputs, one per
    call in the order they were recorded, instead of computing them (its input is ignored)."""

    def __init__(self, outputs: list[torch.Tensor]):
        super().__init__()
        self.outputs, self.calls = outputs, 0

    def forward(self, x):
        out = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        return out.clone()  # what reads it may write in place (an in-place ReLU); the record must stay as it was


#: the largest record of unit outputs the greedy rule keeps to skip recomputing the units before a tried one;
#: above it (many or large images) every trial runs the whole network
REPLAY_BYTES = 2 << 30


def _record_units(work: nn.Module, state: dict, logit_error) -> tuple[list, dict] | None:
    """One pass of ``logit_error`` over ``work`` that records every kept unit's outputs: the execution order of
    the units and their outputs per call; None where a unit runs more than once a call or the record is too big."""
    order, outputs, handles = [], {}, []
    for path, st in state.items():
        for i, unit in enumerate(st["units"]):
            if i in st["dropped"]:
                continue

            def hook(module, inputs, output, key=(path, i)):
                if key not in outputs:
                    order.append(key)
                    outputs[key] = []
                outputs[key].append(output.detach().clone() if isinstance(output, torch.Tensor) else output)
            handles.append(unit.register_forward_hook(hook))
    try:
        logit_error(work)
    finally:
        for h in handles:
            h.remove()
    calls = {len(v) for v in outputs.values()}
    size = sum(t.numel() * t.element_size() for v in outputs.values() for t in v if isinstance(t, torch.Tensor))
    if len(calls) != 1 or size > REPLAY_BYTES or not all(isinstance(t, torch.Tensor) for v in outputs.values()
                                                         for t in v):
        return None
    return order, outputs


def _greedy(teacher: nn.Module, found, plan: DepthPlan, logit_error) -> None:
    """Drop teacher units one at a time by the smallest few-shot logit error (on a working copy).

    A trial drops one unit; the units that run before it are replayed from one recorded pass per round instead
    of recomputed (the same values, so the same choice): 2.78x faster on ResNet-56 -> ResNet-20 (benchmarks/greedy_speed.py)."""
    work = copy.deepcopy(teacher).eval()
    state = {}
    for path, t_seq, s_seq in found:
        cands = _candidates(t_seq, s_seq, path)
        state[path] = {"cands": cands, "dropped": set(), "need": len(t_seq) - len(s_seq),
                       "seq": work.get_submodule(path), "units": list(work.get_submodule(path))}
    while any(len(st["dropped"]) < st["need"] for st in state.values()):
        recorded = _record_units(work, state, logit_error)
        best = None
        for path, st in state.items():
            if len(st["dropped"]) >= st["need"]:
                continue
            for i, unit in enumerate(st["units"]):
                if (i in st["dropped"] or not droppable(unit)
                        or _match_first(st["cands"], st["dropped"] | {i}) is None):
                    continue
                before = recorded[0][:recorded[0].index((path, i))] if recorded else []
                for key in before:
                    state[key[0]]["seq"][key[1]] = _Replay(recorded[1][key])
                st["seq"][i] = nn.Identity()
                try:
                    error = logit_error(work)
                except RuntimeError:  # the unit changes the shape: it cannot be dropped
                    error = None
                finally:
                    st["seq"][i] = unit
                    for key in before:
                        state[key[0]]["seq"][key[1]] = state[key[0]]["units"][key[1]]
                if error is not None and (best is None or error < best[0]):
                    best = (error, path, i)
        if best is None:
            raise Underivable("the greedy depth rule found no unit that can be dropped: only units with weights of "
                              "their own that keep the shape can go, never a normalisation layer or an activation")
        _, path, i = best
        state[path]["dropped"].add(i)
        state[path]["seq"][i] = nn.Identity()
    for path, st in state.items():
        plan.selections[path] = _match_first(st["cands"], st["dropped"])
        remaining = [i for i in range(len(st["units"])) if i not in st["dropped"]]
        if plan.selections[path] != remaining:  # every kept unit is used, in order
            raise Underivable(f"'{path}': the greedy rule kept units {remaining} that the student cannot take in order")


def apply_depth(teacher: nn.Module, plan: DepthPlan) -> nn.Module:
    """A copy of the teacher with only the chosen units (renumbered 0..k-1, as in the student)."""
    reduced = copy.deepcopy(teacher)
    # outer first: inner paths are post-selection; "" is the module itself
    for path in sorted(plan.selections, key=lambda p: p.count(".") + 1 if p else 0):
        seq = reduced.get_submodule(path)
        units = [seq[i] for i in plan.selections[path]]
        kept = nn.Sequential(*units) if isinstance(seq, nn.Sequential) else nn.ModuleList(units)
        if not path:
            reduced = kept
            continue
        parent_path, _, name = path.rpartition(".")
        parent = reduced.get_submodule(parent_path) if parent_path else reduced
        if isinstance(parent, _CONTAINERS):
            parent[int(name)] = kept
        else:
            setattr(parent, name, kept)
    return reduced


@torch.no_grad()
def logit_error_fn(reference: nn.Module, inputs: torch.Tensor, chunk: int = 128) -> Callable[[nn.Module], float]:
    """``model -> ‖model(x) − reference(x)‖² / ‖reference(x)‖²`` on normalised ``inputs`` (eval mode)."""
    reference.eval()
    targets = [reference(x).double() for x in inputs.split(chunk)]
    scale = sum(float((t * t).sum()) for t in targets) or 1.0

    @torch.no_grad()
    def error(model: nn.Module) -> float:
        model.eval()
        return sum(float(((model(x).double() - t) ** 2).sum()) for x, t in zip(inputs.split(chunk), targets)) / scale

    return error
