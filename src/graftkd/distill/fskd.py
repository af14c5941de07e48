"""FSKD (Li et al., CVPR 2020): prune the teacher, then fix each layer in closed form on a few images.

The student is the teacher with filters removed (L1-norm selection, Li et al. 2017) down to the widths
of the requested zoo student, which must therefore have the teacher's layers (same graph, fewer
channels): vgg16_bn -> vgg16_graft_bn / vgg16_half_bn, vgg16 -> vgg16_graft / vgg16_half,
digits_cnn -> digits_cnn_half. Then, in network order, every Conv2d/Linear whose input is changed by
the pruning gets a C×C map Q on its output (a 1×1 conv), fitted so that the student's output there
(fed by the already corrected earlier layers) matches the teacher's output at the kept channels, and Q
is folded into the layer (W <- Q·W, b <- Q·b). The result is the plain student architecture.

Design choices (all closed form: no labels, no SGD, the epoch budget is not used):

- Layers are matched *before* any BatchNorm, i.e. at the conv's own output. The pruned student keeps
  the teacher's BatchNorm parameters and statistics for the kept channels, so equal pre-BN outputs
  mean equal post-BN outputs; per output channel the least-squares solution is the same either way.
- Least squares via the normal equations accumulated in float64 over all pixels of all images, with a
  ridge that shrinks Q towards the identity (no correction) rather than towards 0:
  (G + λI) Qᵀ = B + λI, λ = ``ridge``·tr(G)/C, solved by Cholesky; the ridge keeps dead ReLU channels
  and layers with fewer rows than channels (a Linear on a few hundred images) well-posed, and leaves Q
  the identity in directions the images never reach. ``ridge=0`` is plain least squares (a singular
  G then gets the minimum-norm solution: gelsd on CPU, a pseudo-inverse on GPU).
- Q has no bias, as in the paper.
- Rows are the few-shot images (normalised, no augmentation); ``copies`` > 0 adds that many
  augmented copies (``task.augment`` with ``task.generator``) for more rows.
- Every fold is checked numerically on a probe batch; a mismatch is a bug and raises.
- Runs in fp32 whatever ``task.precision`` says: a closed-form fit needs the accuracy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from graftkd.derive.repair import (
    _collect,
    _fold_and_check,
    _relative_logit_error,
    _residual,
    solve_correction,
)
from graftkd.derive.width import Underivable, WidthPlan, _shape, load_narrowed
from graftkd.distill.base import FewShotMethod, FewShotTask, MethodOutcome, register_method
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


@register_method("fskd")
class FSKD(FewShotMethod):
    # correct=False stops after pruning: the L1-pruned teacher alone, as a reference point for ablations.
    defaults = {"ridge": 1e-4, "copies": 0, "fit_linear": True, "correct": True}
    own_student = True

    def run(self, task: FewShotTask) -> MethodOutcome:
        return self.fit(task)[0]

    def fit(self, task: FewShotTask) -> tuple[MethodOutcome, list[_Layer]]:
        """Prune (and correct) ``task.student`` in place; also return the pruning plan, for callers that
        continue from this student (``graft_fskd``)."""
        start = time.perf_counter()
        ridge = float(self.options["ridge"])
        if ridge < 0:
            raise GraftkdError(f"fskd option ridge must be >= 0, got {ridge}")
        teacher, student = task.teacher, task.student
        teacher.eval()
        student.eval()
        layers, norms = prune_plan(teacher, student, tuple(task.images.shape[1:]),
                                   teacher_name=task.teacher_arch, student_name=task.student_arch)
        load_pruned(teacher, student, layers, norms)
        inputs = self._inputs(task)
        chunk = max(int(task.batch_size), 1)
        logit_before = _relative_logit_error(teacher, student, inputs, chunk)

        records: list[dict] = []
        from tqdm.auto import tqdm

        for layer in tqdm(layers, desc="fskd: least squares per layer", unit="layer", disable=not task.progress,
                          leave=False):
            if not self.options["correct"] or not layer.affected or (
                    layer.kind == "linear" and not self.options["fit_linear"]):
                continue
            fit_start = time.perf_counter()
            stats = _collect(teacher, student, layer, inputs, chunk)
            q = solve_correction(stats["gram"], stats["cross"], ridge)
            after = _residual(q, stats)
            fold_error = _fold_and_check(student.get_submodule(layer.path), q, stats["probe"])
            records.append({
                "layer": layer.path, "kind": layer.kind, "channels": [len(layer.out_keep), layer.teacher_out],
                "rows": int(stats["rows"]), "rel_error_before": stats["before"] / stats["target"],
                "rel_error_after": after / stats["target"], "fold_max_abs_diff": fold_error,
                "seconds": time.perf_counter() - fit_start,
            })
        logit_after = _relative_logit_error(teacher, student, inputs, chunk) if records else logit_before
        seconds = time.perf_counter() - start
        student.eval()
        pruned = [{"layer": la.path, "kept": len(la.out_keep), "of": la.teacher_out}
                  for la in layers if len(la.out_keep) < la.teacher_out]
        stage = {"name": "fskd", "kind": "fskd", "epochs": 0, "steps": 0, "solves": len(records),
                 "images": int(len(inputs)), "seconds": seconds, "final_loss": logit_after, "loss_curve": []}
        extra = {"arch": task.student_arch or type(student).__name__, "pruned_layers": pruned, "layers": records,
                 "logit_rel_error_pruned": logit_before, "logit_rel_error_corrected": logit_after,
                 "solver": "normal equations, float64, ridge towards identity, Cholesky",
                 "ridge": ridge, "rows_images": int(len(inputs)), "seconds": seconds}
        return MethodOutcome(student=student, stages=[stage], extra=extra), layers

    def _inputs(self, task: FewShotTask) -> torch.Tensor:
        """Normalised few-shot images, plus ``copies`` augmented copies when asked."""
        copies = int(self.options["copies"])
        if copies < 0:
            raise GraftkdError(f"fskd option copies must be >= 0, got {copies}")
        if copies and task.augment is None:
            raise GraftkdError("fskd option copies needs augmentation: enable it or set copies=0")
        with torch.no_grad():
            batches = [task.normalize(task.images)]
            for _ in range(copies):
                batches.append(task.normalize(task.augment(task.images, task.generator)))
        return torch.cat(batches).float()


# ---------------------------------------------------------------------------------------- pruning
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
