"""The exact merge of Eq. 6: fold each adapter product into the next student block.

Between student blocks l and l+1 the grafted chain computes a^{t→s}_l ∘ a^{s→t}_l, a C_s×C_s channel
matrix M_l. Every layer that reads block l+1's input (its first conv, a projection shortcut, the
classifier's Linear after flatten or average pooling) is linear in that input, so W ← W·M_l gives the
same function with the plain student's parameter shapes. Anything else that reads the input directly
(an identity shortcut, a BatchNorm, a max-pool) does not commute with channel mixing: such a cut cannot
be folded and is refused when the plan is built, never approximated.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from graftkd.errors import GraftkdError

# Ops that act on each channel independently and linearly, so they commute with a channel matrix.
_TRANSPARENT_MODULES = (nn.Flatten, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Identity, nn.Dropout)
_TRANSPARENT_FUNCTIONS = {torch.flatten, torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.avg_pool2d}
_TRANSPARENT_METHODS = {"flatten", "view", "reshape", "contiguous"}


@dataclass(frozen=True)
class FoldTarget:
    """A layer inside a student block that consumes the block's input: where M_l is folded."""

    path: str  # module path inside the block
    kind: str  # "conv" or "linear"
    positions: int  # spatial positions per channel in a flattened Linear input (1 otherwise)


def find_fold_targets(block: nn.Module, input_shape: tuple[int, ...], *, where: str) -> list[FoldTarget]:
    """Trace ``block`` and list every Conv2d/Linear that reads its input through per-channel linear ops.

    Raises GraftkdError naming the op when the input reaches anything a channel matrix cannot pass.
    """
    try:
        graph_module = torch.fx.symbolic_trace(block)
    except Exception as exc:
        raise GraftkdError(
            f"cannot trace {where} to fold adapters into it ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "make the teacher and student widths equal at this cut so no adapter is needed"
        ) from exc
    channels = input_shape[0]
    example = torch.zeros((2, *input_shape))
    was_training = block.training
    block.eval()
    try:
        ShapeProp(graph_module).propagate(example)
    finally:
        block.train(was_training)
    placeholder = next(node for node in graph_module.graph.nodes if node.op == "placeholder")

    targets: list[FoldTarget] = []

    def refuse(what: str) -> GraftkdError:
        return GraftkdError(
            f"cannot fold the adapters into {where}: its input feeds {what}, which does not commute with a "
            "channel map (e.g. an identity or parameter-free shortcut); make teacher and student widths "
            "equal at this cut, or give the student block a projection shortcut"
        )

    def walk(node: torch.fx.Node) -> None:
        for user in node.users:
            if user.op == "call_module":
                module = graph_module.get_submodule(user.target)
                if isinstance(module, nn.Conv2d):
                    if module.groups != 1 or module.in_channels != channels:
                        raise refuse(f"a grouped or depthwise conv '{user.target}'")
                    targets.append(FoldTarget(str(user.target), "conv", 1))
                elif isinstance(module, nn.Linear):
                    if module.in_features % channels:
                        raise refuse(f"Linear '{user.target}' with {module.in_features} inputs (not a multiple of {channels})")
                    targets.append(FoldTarget(str(user.target), "linear", module.in_features // channels))
                elif isinstance(module, _TRANSPARENT_MODULES):
                    walk(user)
                else:
                    raise refuse(f"{type(module).__name__} '{user.target}'")
            elif user.op == "call_function" and user.target in _TRANSPARENT_FUNCTIONS:
                walk(user)
            elif user.op == "call_method" and user.target in _TRANSPARENT_METHODS:
                meta = user.meta.get("tensor_meta")
                if user.target in ("view", "reshape") and (meta is None or len(meta.shape) != 2):
                    raise refuse(f"a .{user.target}() to a shape other than (N, features)")
                walk(user)
            elif user.op == "output":
                raise refuse("the block's output directly")
            else:
                label = getattr(user.target, "__name__", str(user.target))
                if user.target in (operator.add, torch.add, operator.iadd):
                    label = "an addition (identity shortcut)"
                raise refuse(label)

    walk(placeholder)
    if not targets:
        raise refuse("no Conv2d or Linear layer")
    return targets


@torch.no_grad()
def fold_into(block: nn.Module, targets: list[FoldTarget], matrix: torch.Tensor) -> None:
    """Replace each target weight W by W·M (input side), in place: exact because M is linear, bias-free."""
    for target in targets:
        layer = block.get_submodule(target.path)
        weight = layer.weight
        m = matrix.to(dtype=torch.float64, device=weight.device)
        if target.kind == "conv":
            folded = torch.einsum("oikl,ij->ojkl", weight.double(), m)
        else:
            out_features = weight.shape[0]
            w = weight.double().view(out_features, m.shape[0], target.positions)
            folded = torch.einsum("ois,ij->ojs", w, m).reshape(out_features, -1)
        weight.copy_(folded.to(weight.dtype))
