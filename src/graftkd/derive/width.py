"""Width derivation: a narrower student layer takes a subset of its teacher layer's channels.

The teacher and the student (after the depth derivation, they have the same layers) are traced with
``torch.fx`` and matched node by node. Every tensor with a channel axis belongs to a *channel space*:
a Conv2d/Linear opens a new one, per-channel operations (BatchNorm, ReLU, pooling, dropout, a depthwise
convolution) pass it through, and a residual addition *unifies* the spaces of its two inputs, so the same
channels are kept in every layer that writes into one residual stream (a shortcut conv, the last conv of every
unit). Any other operation (option-A zero padding, concatenation, a multiplication, a convolution in groups)
pins the spaces around it: they must keep their full width, or the pair is not derivable.

Criteria (the record names the one used):

- ``l1``: sum over the space's writers of each output filter's L1 norm (each writer's norms divided by
  their mean, so wide and narrow layers weigh the same); for a plain chain this is FSKD's rule (Li et al. 2017);
- ``activation``: data-driven, the mean absolute activation of each channel on the few-shot images in
  the teacher, at the space's nodes after the nonlinearity or residual sum (what the next layer reads;
  each node divided by its mean).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from graftkd.derive.depth import Underivable

WIDTH_RULES = ("l1", "activation")
_PER_CHANNEL = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.MaxPool2d, nn.AvgPool2d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Identity)
_PER_CHANNEL_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6,
                          torch.nn.functional.silu, torch.nn.functional.gelu,
                          torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.max_pool2d,
                          torch.nn.functional.avg_pool2d, torch.nn.functional.dropout}
_ADD = {operator.add, operator.iadd, torch.add}
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class PrunedLayer:
    """One Conv2d/Linear of the teacher and the channels its student copy keeps."""

    path: str
    kind: str  # "conv", "linear", "depthwise" (one filter per channel) or "grouped": for the last two the
    # weight's input axis (one group's channels) stays whole
    in_keep: torch.Tensor
    out_keep: torch.Tensor
    teacher_in: int
    teacher_out: int
    affected: bool  # its input differs from the teacher's (some earlier layer lost channels)


@dataclass
class WidthPlan:
    rule: str
    layers: list[PrunedLayer]  # network order
    norms: dict[str, torch.Tensor]  # BatchNorm path -> kept channels

    def narrowed(self) -> list[PrunedLayer]:
        return [la for la in self.layers if len(la.out_keep) < la.teacher_out or len(la.in_keep) < la.teacher_in]


class _Spaces:
    """Union-find over channel spaces, with the widths seen and whether a space is pinned to full width."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.widths: list[set[tuple[int, int]]] = []
        self.pinned: list[str | None] = []
        self.writers: list[list[str]] = []
        self.readers: list[list[str]] = []
        self.nodes: list[list[str]] = []

    def new(self, widths: tuple[int, int], node: str, pinned: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.widths.append({widths})
        self.pinned.append(pinned)
        self.writers.append([])
        self.readers.append([])
        self.nodes.append([node])
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            self.widths[a] |= self.widths[b]
            self.pinned[a] = self.pinned[a] or self.pinned[b]
            self.writers[a] += self.writers[b]
            self.readers[a] += self.readers[b]
            self.nodes[a] += self.nodes[b]
        return a


def _trace(model: nn.Module, sample: torch.Tensor, role: str) -> torch.fx.GraphModule:
    try:
        graph = torch.fx.symbolic_trace(model)
    except Exception as exc:
        raise Underivable(f"cannot trace the {role} {type(model).__name__} with torch.fx ({type(exc).__name__}): "
                          "width derivation needs an fx-traceable model") from exc
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample)  # a plain run first: ShapeProp prints a traceback of its own on failure
            ShapeProp(graph).propagate(sample)
    except RuntimeError as exc:
        raise Underivable(f"the {role} {type(model).__name__} does not run on an input of shape "
                          f"{tuple(sample.shape[1:])} after taking teacher units ({str(exc).splitlines()[0][:120]})") from exc
    finally:
        model.train(was)
    return graph


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _channel_widths(t_node, s_node) -> tuple[int, int] | None:
    t, s = _shape(t_node), _shape(s_node)
    if t is None or s is None or len(t) < 2 or len(s) < 2:
        return None
    return int(t[1]), int(s[1])


def plan_width(teacher: nn.Module, student: nn.Module, input_shape: tuple[int, ...], rule: str = "l1",
               inputs: torch.Tensor | None = None, student_input_shape: tuple[int, ...] | None = None) -> WidthPlan:
    """Match the graphs and choose the kept channels of every channel space (``rule``: l1 or activation).

    ``inputs`` (teacher-side inputs, normalised) are needed for ``activation``. A ``student_input_shape``
    (a block cut out of a network) lets the input and output channels be chosen too: grafting's adapters
    carry the choice across the cut.
    Raises :class:`Underivable` when the student is not the teacher with fewer channels.
    """
    if rule not in WIDTH_RULES:
        raise Underivable(f"unknown width rule '{rule}': use one of {', '.join(WIDTH_RULES)}")
    device = next(teacher.parameters()).device
    sample = torch.zeros((2, *input_shape), device=device)
    s_sample = torch.zeros((2, *(student_input_shape or input_shape)), device=device)
    free_input = student_input_shape is not None
    t_graph, s_graph = _trace(teacher, sample, "teacher"), _trace(student, s_sample, "student")
    t_nodes, s_nodes = list(t_graph.graph.nodes), list(s_graph.graph.nodes)

    def key(graph, node) -> tuple:
        kind = type(graph.get_submodule(node.target)).__name__ if node.op == "call_module" else ""
        return node.op, str(node.target), kind

    if len(t_nodes) != len(s_nodes) or any(key(t_graph, a) != key(s_graph, b) for a, b in zip(t_nodes, s_nodes)):
        raise Underivable(f"the student {type(student).__name__} does not have the teacher's layers "
                          "(their fx graphs differ): only narrower copies of the same layers can take teacher channels")

    spaces = _Spaces()
    space_of: dict[str, int] = {}  # node name -> channel space of its output
    flat_of: dict[str, tuple[int, int]] = {}  # flattened node -> (space, positions per channel)
    affected: dict[str, bool] = {}
    pending: list[tuple[str, str, torch.fx.Node, int | tuple[int, int], int]] = []  # layers, resolved at the end
    norm_spaces: dict[str, int] = {}

    def refuse(node, why: str) -> Underivable:
        return Underivable(f"cannot take teacher channels for '{node.name}': {why}")

    def pin_inputs(node, why: str) -> None:
        for a in node.all_input_nodes:
            if a.name in space_of:
                root = spaces.find(space_of[a.name])
                spaces.pinned[root] = spaces.pinned[root] or f"'{node.name}' ({why})"
            if a.name in flat_of:
                root = spaces.find(flat_of[a.name][0])
                spaces.pinned[root] = spaces.pinned[root] or f"'{node.name}' ({why})"

    for t_node, s_node in zip(t_nodes, s_nodes):
        widths = _channel_widths(t_node, s_node)
        inputs_ = list(t_node.all_input_nodes)
        in_affected = any(affected.get(a.name, False) for a in inputs_)
        source = inputs_[0] if inputs_ else None
        passthrough = source is not None and source.name in space_of
        if t_node.op == "output":
            if not free_input:  # a block cut out of a network: adapters carry its output channels too
                pin_inputs(t_node, "the network output")
            continue
        if t_node.op == "placeholder":
            if widths:
                space_of[t_node.name] = spaces.new(widths, t_node.name, None if free_input else "the network input")
            affected[t_node.name] = False
            continue
        if t_node.op == "call_module":
            t_mod = teacher.get_submodule(t_node.target)
            if isinstance(t_mod, (nn.Conv2d, nn.Linear)):
                grouped = isinstance(t_mod, nn.Conv2d) and t_mod.groups != 1
                if grouped and _depthwise(t_mod) and passthrough and _depthwise(student.get_submodule(t_node.target)):
                    # one filter per channel: it acts per channel, so it keeps its input's channels (its weight's
                    # input axis has size 1, and keeps all of it)
                    space_of[t_node.name] = space_of[source.name]
                    spaces.nodes[spaces.find(space_of[source.name])].append(t_node.name)
                    pending.append((str(t_node.target), "depthwise", t_node, space_of[source.name], 1))
                    affected[t_node.name] = in_affected
                    continue
                if isinstance(t_mod, nn.Linear) and source.name in flat_of:
                    reads: int | tuple[int, int] = flat_of[source.name]
                elif source is not None and source.name in space_of:
                    reads = space_of[source.name]
                else:
                    raise refuse(t_node, "its input has no channel axis that can be followed")
                t_in = t_mod.in_channels if isinstance(t_mod, nn.Conv2d) else t_mod.in_features
                # other groups (ShuffleNetV1's): a channel choice would have to respect the groups, so the channels
                # on both sides are kept whole and the layer is copied as it is
                whole = "a grouped convolution keeps its channels whole" if grouped else None
                if whole:
                    pin_inputs(t_node, whole)
                space = spaces.new(widths, t_node.name, whole and f"'{t_node.name}' ({whole})")
                spaces.writers[space].append(str(t_node.target))
                spaces.readers[spaces.find(reads[0] if isinstance(reads, tuple) else reads)].append(str(t_node.target))
                space_of[t_node.name] = space
                kind = "grouped" if grouped else "conv" if isinstance(t_mod, nn.Conv2d) else "linear"
                pending.append((str(t_node.target), kind, t_node, reads, t_in // t_mod.groups if grouped else t_in))
                affected[t_node.name] = in_affected or widths[0] != widths[1]
                continue
            if isinstance(t_mod, _NORMS) and passthrough:
                norm_spaces[str(t_node.target)] = space_of[source.name]
                space_of[t_node.name] = space_of[source.name]
                spaces.nodes[spaces.find(space_of[source.name])].append(t_node.name)
                affected[t_node.name] = in_affected
                continue
            if isinstance(t_mod, _PER_CHANNEL) and passthrough:
                space_of[t_node.name] = space_of[source.name]
                spaces.nodes[spaces.find(space_of[source.name])].append(t_node.name)
                affected[t_node.name] = in_affected
                continue
            if isinstance(t_mod, nn.Flatten) and passthrough and t_mod.start_dim == 1:
                flat_of[t_node.name] = (space_of[source.name], _positions(_shape(source)))
                affected[t_node.name] = in_affected
                continue
        elif passthrough and ((t_node.op == "call_function" and t_node.target in _PER_CHANNEL_FUNCTIONS) or (
                t_node.op == "call_method" and t_node.target in ("relu", "contiguous"))):
            space_of[t_node.name] = space_of[source.name]
            spaces.nodes[spaces.find(space_of[source.name])].append(t_node.name)
            affected[t_node.name] = in_affected
            continue
        elif (t_node.op == "call_function" and t_node.target is torch.flatten) or (
                t_node.op == "call_method" and t_node.target in ("flatten", "view", "reshape")):
            t_shape = _shape(t_node)
            start = (t_node.args[1] if len(t_node.args) > 1 else t_node.kwargs.get("start_dim", 0)) \
                if t_node.target is torch.flatten or t_node.target == "flatten" else 1
            if passthrough and start == 1 and t_shape is not None and len(t_shape) == 2:
                flat_of[t_node.name] = (space_of[source.name], _positions(_shape(source)))
                affected[t_node.name] = in_affected
                continue
        elif t_node.op == "call_function" and t_node.target in _ADD:
            tensors = [a for a in t_node.args if isinstance(a, torch.fx.Node) and a.name in space_of]
            if len(tensors) == 2 and widths is not None:
                root = spaces.union(space_of[tensors[0].name], space_of[tensors[1].name])
                spaces.widths[root].add(widths)
                spaces.nodes[root].append(t_node.name)
                space_of[t_node.name] = root
                affected[t_node.name] = in_affected
                continue
            if len(tensors) == 1 and passthrough:  # x + constant acts per channel
                space_of[t_node.name] = space_of[tensors[0].name]
                affected[t_node.name] = in_affected
                continue
        # anything else: the channels on both sides must stay whole
        what = t_node.target if isinstance(t_node.target, str) else getattr(t_node.target, "__name__", "op")
        pin_inputs(t_node, f"{what} does not act per channel")
        if widths is not None:
            space_of[t_node.name] = spaces.new(widths, t_node.name, f"'{t_node.name}' ({what} does not act per channel)")
        affected[t_node.name] = in_affected

    keeps = _choose(spaces, teacher, rule, t_graph, inputs)

    def keep_of(reads) -> torch.Tensor:
        if isinstance(reads, tuple):
            kept, positions = keeps[spaces.find(reads[0])], reads[1]
            return (kept[:, None] * positions + torch.arange(positions)[None, :]).reshape(-1)
        return keeps[spaces.find(reads)]

    layers = []
    for path, kind, node, reads, t_in in pending:
        in_keep, out_keep = keep_of(reads), keeps[spaces.find(space_of[node.name])]
        s_mod = student.get_submodule(path)
        s_in = s_mod.in_channels if isinstance(s_mod, nn.Conv2d) else s_mod.in_features
        if kind in ("depthwise", "grouped"):  # the weight's input axis (the channels of one group) is kept whole
            layers.append(PrunedLayer(path, kind, torch.arange(t_in), out_keep, t_in,
                                      _out_width(teacher.get_submodule(path)), affected[node.name]))
            continue
        if len(in_keep) != s_in:
            raise refuse(node, f"the student layer reads {s_in} channels but the derivation leaves {len(in_keep)}")
        layers.append(PrunedLayer(path, kind, in_keep, out_keep, t_in, _out_width(teacher.get_submodule(path)),
                                  affected[node.name]))
    norms = {path: keeps[spaces.find(space)] for path, space in norm_spaces.items()}
    return WidthPlan(rule, layers, norms)


def _depthwise(module: nn.Module) -> bool:
    """A convolution with one filter per channel (MobileNet's 3x3): it acts on each channel alone."""
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels


def _input_columns(weight: torch.Tensor, width: int) -> torch.Tensor:
    """L1 norm of each input channel's weights (a Linear reading a flattened map: summed per channel)."""
    columns = weight.detach().abs().transpose(0, 1).flatten(1).sum(1)
    return columns.reshape(width, -1).sum(1) if columns.numel() != width else columns


def _out_width(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def _positions(shape: tuple[int, ...] | None) -> int:
    positions = 1
    for size in (shape or ())[2:]:
        positions *= int(size)
    return positions


def _choose(spaces: _Spaces, teacher: nn.Module, rule: str, graph: torch.fx.GraphModule,
            inputs: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """Kept channel indices (ascending) of every root space."""
    roots = sorted({spaces.find(i) for i in range(len(spaces.parent))})
    keeps: dict[int, torch.Tensor] = {}
    narrowed = []
    for root in roots:
        widths = spaces.widths[root]
        if len(widths) != 1:
            raise Underivable(f"a residual stream has different widths at different nodes ({sorted(widths)}): "
                              "every layer that adds into it must have the same width")
        (t_width, s_width), = widths
        if s_width > t_width:
            raise Underivable(f"a student layer is wider than the teacher's ({s_width} > {t_width} channels at "
                              f"'{spaces.nodes[root][0]}'): a derived student can only be narrower")
        if s_width == t_width:
            keeps[root] = torch.arange(t_width)
            continue
        if spaces.pinned[root]:
            raise Underivable(f"channels at '{spaces.nodes[root][0]}' ({t_width} -> {s_width}) cannot be chosen: they "
                              f"reach {spaces.pinned[root]}")
        narrowed.append((root, t_width, s_width))
    scores = _activation_scores(graph, inputs, spaces, [r for r, _, _ in narrowed]) if rule == "activation" and narrowed else {}
    for root, t_width, s_width in narrowed:
        if rule == "l1":
            score = torch.zeros(t_width, dtype=torch.float64)
            # the writers' output filters; a space nobody writes (a block's input) by its readers' input columns
            norms = [teacher.get_submodule(p).weight.detach().abs().flatten(1).sum(1) for p in spaces.writers[root]]
            if not norms:
                norms = [_input_columns(teacher.get_submodule(p).weight, t_width) for p in spaces.readers[root]]
            for l1 in norms:
                l1 = l1.double().cpu()
                score += l1 / l1.mean().clamp_min(1e-12) if len(norms) > 1 else l1
        else:
            score = scores[root]
        keeps[root] = torch.topk(score, s_width).indices.sort().values
    return keeps


@torch.no_grad()
def _activation_scores(graph: torch.fx.GraphModule, inputs: torch.Tensor | None, spaces: _Spaces,
                       roots: list[int]) -> dict[int, torch.Tensor]:
    """Mean |activation| per channel at every node of each space, on the few-shot images."""
    if inputs is None:
        raise Underivable("the activation width rule needs the few-shot images")
    modules = dict(graph.named_modules())
    by_name = {n.name: n for n in graph.graph.nodes}

    def before_nonlinearity(name: str) -> bool:
        node = by_name.get(name)
        return node is not None and node.op == "call_module" and isinstance(
            modules.get(node.target), (nn.Conv2d, nn.Linear) + _NORMS)

    # what the next layer sees: activations after the nonlinearity (or the residual sum), where the space has any
    wanted = {}
    for root in roots:
        after = [n for n in spaces.nodes[root] if not before_nonlinearity(n)]
        wanted.update({name: root for name in (after or spaces.nodes[root])})
    sums: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in wanted and isinstance(out, torch.Tensor) and out.dim() >= 2:
                dims = [0] + list(range(2, out.dim()))
                value = out.detach().abs().double().mean(dim=dims).cpu()
                sums[n.name] = sums.get(n.name, 0) + value
            return out

    was = graph.training
    graph.eval()
    try:
        for x in inputs.split(128):
            Recorder(graph).run(x)
    finally:
        graph.train(was)
    scores: dict[int, torch.Tensor] = {}
    for name, root in wanted.items():
        if name in sums:
            value = sums[name]
            scores[root] = scores.get(root, 0) + value / value.mean().clamp_min(1e-12)
    return scores


@torch.no_grad()
def load_narrowed(teacher: nn.Module, student: nn.Module, plan: WidthPlan) -> None:
    """Copy the teacher's weights, restricted to the kept channels, into ``student`` (strict load)."""
    state = {key: value.detach().clone() for key, value in teacher.state_dict().items()}
    for layer in plan.layers:
        weight = state[f"{layer.path}.weight"]
        out_keep, in_keep = layer.out_keep.to(weight.device), layer.in_keep.to(weight.device)
        state[f"{layer.path}.weight"] = weight.index_select(0, out_keep).index_select(1, in_keep).clone()
        if f"{layer.path}.bias" in state:
            state[f"{layer.path}.bias"] = state[f"{layer.path}.bias"].index_select(0, out_keep).clone()
    for path, kept in plan.norms.items():
        for name in ("weight", "bias", "running_mean", "running_var"):
            key = f"{path}.{name}"
            if key in state:
                state[key] = state[key].index_select(0, kept.to(state[key].device)).clone()
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise Underivable(f"the narrowed teacher does not load into the student ({str(exc).splitlines()[0]})") from exc
