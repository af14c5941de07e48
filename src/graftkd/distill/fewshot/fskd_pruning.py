"""FSKD's pruning: the teacher with filters removed (L1 norm, Li et al. 2017) down to a zoo student's widths.

``prune_plan`` traces teacher and student with torch.fx and propagates the kept channel sets through the
graph (per-channel modules, norms, flatten); a student that is not a channel-pruned teacher is refused as
an unsupported pairing. ``load_pruned`` copies the kept weights. The closed-form correction that follows is
``graftkd.derive.repair``'s; the method is ``graftkd.distill.fewshot.fskd``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from graftkd.derive.width import Underivable, WidthPlan, _shape, load_narrowed
from graftkd.errors import GraftkdError, UnsupportedPairing

# Modules that act on each channel separately (the channel set passes through unchanged).
_PER_CHANNEL = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveMaxPool2d, nn.Dropout, nn.Identity)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_ALTERNATIVES = "graft, cross, kd"


def _unsupported(message: str) -> UnsupportedPairing:
    return UnsupportedPairing(message)  # the grid records this cell as "unsupported", not "failed"


@dataclass
class _Layer:
    """One Conv2d/Linear of the teacher and what pruning keeps of it."""

    path: str
    kind: str  # "conv" or "linear"
    in_keep: torch.Tensor
    out_keep: torch.Tensor
    teacher_out: int
    affected: bool  # its input differs from the teacher's (some earlier layer lost channels)


def _trace(model: nn.Module, sample: torch.Tensor, role: str) -> torch.fx.GraphModule:
    try:
        graph = torch.fx.symbolic_trace(model)
    except Exception as exc:
        raise _unsupported(
            f"fskd cannot trace the {role} {type(model).__name__} ({type(exc).__name__}); "
            f"it needs an fx-traceable model, or use {_ALTERNATIVES}"
        ) from exc
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(graph).propagate(sample)
    finally:
        model.train(was)
    return graph


def _structure(module: nn.Module) -> tuple:
    """What must match between a teacher layer and its pruned copy (everything but the widths)."""
    if isinstance(module, nn.Conv2d):
        return ("Conv2d", module.kernel_size, module.stride, module.padding, module.dilation, module.groups,
                module.bias is not None, module.padding_mode)
    if isinstance(module, nn.Linear):
        return ("Linear", module.bias is not None)
    if isinstance(module, _NORMS):
        return (type(module).__name__, module.eps, module.affine, module.track_running_stats)
    return (repr(module),)


def _count_layers(graph: torch.fx.GraphModule) -> int:
    return sum(1 for n in graph.graph.nodes if n.op == "call_module"
               and isinstance(graph.get_submodule(n.target), (nn.Conv2d, nn.Linear)))


def prune_plan(teacher: nn.Module, student: nn.Module, input_shape: tuple[int, ...], *,
               teacher_name: str = "", student_name: str = "") -> tuple[list[_Layer], dict[str, torch.Tensor]]:
    """Match the two graphs node by node and choose the kept channels of every layer (L1 norm).

    Returns the Conv2d/Linear layers in network order and, per BatchNorm path, its kept channels.
    Raises an ``unsupported`` GraftkdError when the student is not a channel-pruned teacher.
    """
    t_name = teacher_name or type(teacher).__name__
    s_name = student_name or type(student).__name__
    device = next(teacher.parameters()).device
    sample = torch.zeros((2, *input_shape), device=device)
    t_graph = _trace(teacher, sample, "teacher")
    s_graph = _trace(student, sample.to(next(student.parameters()).device), "student")
    t_nodes, s_nodes = list(t_graph.graph.nodes), list(s_graph.graph.nodes)
    def key(graph: torch.fx.GraphModule, node: torch.fx.Node) -> tuple:
        kind = type(graph.get_submodule(node.target)).__name__ if node.op == "call_module" else ""
        return node.op, node.target, kind

    differ = next((i for i, (a, b) in enumerate(zip(t_nodes, s_nodes)) if key(t_graph, a) != key(s_graph, b)),
                  None if len(t_nodes) == len(s_nodes) else min(len(t_nodes), len(s_nodes)))
    if differ is not None:
        t_layers, s_layers = _count_layers(t_graph), _count_layers(s_graph)
        where = (f"{s_name} has {s_layers} conv/linear layers and {t_name} {t_layers}" if s_layers != t_layers
                 else f"their layer graphs first differ at '{t_nodes[min(differ, len(t_nodes) - 1)].name}'")
        raise _unsupported(
            f"fskd needs a student that is a channel-pruned teacher (same layers, fewer channels), but {where}: "
            f"use a width-reduced {t_name} of the same depth (e.g. vgg16_bn -> vgg16_graft_bn, "
            f"digits_cnn -> digits_cnn_half) or a method for generic students ({_ALTERNATIVES})"
        )

    keep: dict[str, torch.Tensor | None] = {}  # node name -> kept indices along dim 1 of its output
    affected: dict[str, bool] = {}
    layers: list[_Layer] = []
    norms: dict[str, torch.Tensor] = {}
    seen_modules: set[str] = set()

    def refuse(node: torch.fx.Node, why: str) -> GraftkdError:
        return _unsupported(f"fskd cannot prune {t_name} into {s_name} at '{node.name}': {why}; "
                            f"the student must be the teacher with fewer channels on plain conv chains, else use {_ALTERNATIVES}")

    for t_node, s_node in zip(t_nodes, s_nodes):
        if t_node.op == "output":
            continue
        t_shape, s_shape = _shape(t_node), _shape(s_node)
        inputs = [a for a in t_node.all_input_nodes]
        source = inputs[0] if inputs else None
        in_keep = keep.get(source.name) if source is not None else None
        in_affected = any(affected.get(a.name, False) for a in inputs)
        result: torch.Tensor | None
        if t_node.op == "placeholder":
            result = torch.arange(t_shape[1]) if t_shape is not None else None
        elif t_node.op == "call_module":
            t_mod, s_mod = teacher.get_submodule(t_node.target), student.get_submodule(t_node.target)
            if t_node.target in seen_modules and isinstance(t_mod, (nn.Conv2d, nn.Linear) + _NORMS):
                raise refuse(t_node, "a layer with weights is called more than once")
            seen_modules.add(t_node.target)
            if type(t_mod) is not type(s_mod) or _structure(t_mod) != _structure(s_mod):
                raise refuse(t_node, f"teacher {t_mod} and student {s_mod} differ in more than width")
            if isinstance(t_mod, (nn.Conv2d, nn.Linear)):
                if isinstance(t_mod, nn.Conv2d) and t_mod.groups != 1:
                    raise refuse(t_node, "grouped convolutions are not supported")
                if isinstance(t_mod, nn.Linear) and (_shape(source) is None or len(_shape(source)) != 2):
                    raise refuse(t_node, "a Linear layer must read a flat (N, features) input")
                s_in = s_mod.in_channels if isinstance(s_mod, nn.Conv2d) else s_mod.in_features
                if in_keep is None or len(in_keep) != s_in:
                    raise refuse(t_node, f"the student layer reads {s_in} channels but pruning leaves "
                                         f"{None if in_keep is None else len(in_keep)}")
                t_out = t_mod.out_channels if isinstance(t_mod, nn.Conv2d) else t_mod.out_features
                s_out = s_mod.out_channels if isinstance(s_mod, nn.Conv2d) else s_mod.out_features
                if s_out > t_out:
                    raise refuse(t_node, f"the student layer is wider than the teacher's ({s_out} > {t_out})")
                result = _l1_keep(t_mod.weight, s_out)
                layers.append(_Layer(str(t_node.target), "conv" if isinstance(t_mod, nn.Conv2d) else "linear",
                                     in_keep, result, t_out, in_affected))
                in_affected = in_affected or s_out < t_out
            elif isinstance(t_mod, _NORMS):
                norms[str(t_node.target)] = in_keep
                result = in_keep
            elif isinstance(t_mod, _PER_CHANNEL):
                result = in_keep
            elif isinstance(t_mod, nn.Flatten):
                result = _flatten_keep(in_keep, _shape(source), t_mod.start_dim, t_node)
            else:
                result = _full_or_refuse(t_node, inputs, keep, t_shape, refuse)
        elif t_node.op == "call_function" and t_node.target is torch.flatten:
            start_dim = t_node.args[1] if len(t_node.args) > 1 else t_node.kwargs.get("start_dim", 0)
            result = _flatten_keep(in_keep, _shape(source), start_dim, t_node)
        elif t_node.op == "call_method" and t_node.target in ("flatten", "view", "reshape", "contiguous"):
            if t_node.target == "contiguous":
                result = in_keep
            else:
                if t_shape is None or len(t_shape) != 2:
                    raise refuse(t_node, f".{t_node.target}() must give a flat (N, features) tensor")
                result = _flatten_keep(in_keep, _shape(source), 1, t_node)
        else:
            result = _full_or_refuse(t_node, inputs, keep, t_shape, refuse)
        if result is not None and s_shape is not None and len(s_shape) > 1 and len(result) != s_shape[1]:
            raise refuse(t_node, f"the student has {s_shape[1]} channels here but pruning the teacher "
                                 f"leaves {len(result)}")
        keep[t_node.name] = result
        affected[t_node.name] = in_affected
    return layers, norms


def _l1_keep(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (in original order) of the ``count`` output filters with the largest L1 norm."""
    if count == weight.shape[0]:
        return torch.arange(count)
    scores = weight.detach().abs().flatten(1).sum(1).cpu()
    return torch.topk(scores, count).indices.sort().values


def _flatten_keep(keep: torch.Tensor | None, shape: tuple[int, ...] | None, start_dim: int,
                  node: torch.fx.Node) -> torch.Tensor | None:
    """Kept features after flattening (C, H, W) channel-major: each kept channel keeps its H·W positions."""
    if keep is None or shape is None:
        return None
    if start_dim != 1:
        raise _unsupported(f"fskd cannot follow channels through '{node.name}': only flatten(start_dim=1) is supported")
    positions = 1
    for size in shape[2:]:
        positions *= int(size)
    return (keep[:, None] * positions + torch.arange(positions)[None, :]).reshape(-1)


def _full_or_refuse(node, inputs, keep, shape, refuse) -> torch.Tensor | None:
    """Any other op (an addition, a shortcut, a concatenation) is only allowed on unpruned tensors."""
    for source in inputs:
        kept, source_shape = keep.get(source.name), _shape(source)
        if kept is not None and source_shape is not None and len(source_shape) > 1 and len(kept) != source_shape[1]:
            raise refuse(node, f"its input '{source.name}' lost channels, and {node.target} does not act "
                               "per channel (e.g. a residual addition)")
    return torch.arange(shape[1]) if shape is not None and len(shape) > 1 else None


def load_pruned(teacher: nn.Module, student: nn.Module, layers: list[_Layer], norms: dict[str, torch.Tensor]) -> None:
    """Copy the teacher's weights, restricted to the kept channels, into ``student`` (strict load)."""
    try:
        load_narrowed(teacher, student, WidthPlan("l1", layers, norms))
    except Underivable as exc:
        raise _unsupported(f"fskd: {exc}; the student must be a channel-pruned teacher, or use {_ALTERNATIVES}") from exc
