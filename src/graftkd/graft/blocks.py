"""The block API: any network described as an ordered list of L blocks whose composition is the network.

A teacher T = f_L ∘ … ∘ f_1 and a student S = h_L ∘ … ∘ h_1 are each given either by a zoo model's
``blocks()`` method or by module paths into an ordinary ``nn.Module``. Grafting replaces blocks, so
the composition must be *exactly* the model's forward: this is checked once on a dummy batch instead of
being assumed, because a forgotten ``torch.flatten`` in a custom forward would otherwise silently train
the wrong function.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from graftkd.errors import GraftkdError

BlockList = Sequence[nn.Module] | Sequence[str] | None


def resolve_blocks(model: nn.Module, blocks: BlockList = None, *, role: str = "model") -> list[nn.Module]:
    """Turn ``blocks`` (None → ``model.blocks()``, module paths, or modules) into a list of modules."""
    if blocks is None:
        if not hasattr(model, "blocks"):
            raise GraftkdError(
                f"the {role} {type(model).__name__} has no blocks() method: pass its block list as module "
                "paths, e.g. blocks=['stem', 'layer1', 'layer2', 'head']"
            )
        resolved = list(model.blocks())
    else:
        resolved = []
        for item in blocks:
            if isinstance(item, str):
                try:
                    resolved.append(model.get_submodule(item))
                except AttributeError:
                    names = [n for n, _ in model.named_children()]
                    raise GraftkdError(
                        f"the {role} has no submodule '{item}' (top-level children: {', '.join(names)})"
                    ) from None
            elif isinstance(item, nn.Module):
                resolved.append(item)
            else:
                raise GraftkdError(f"{role} block {item!r} is neither a module path nor an nn.Module")
    if len(resolved) < 2:
        raise GraftkdError(f"the {role} needs at least 2 blocks to graft, got {len(resolved)}")
    return resolved


def block_names(model: nn.Module, blocks: BlockList, count: int) -> list[str]:
    """Human names for reports: the model's own names, the given paths, or block1..blockL."""
    if blocks is not None and all(isinstance(b, str) for b in blocks):
        return [str(b) for b in blocks]
    if blocks is None and hasattr(model, "block_names"):
        names = list(model.block_names())
        if len(names) == count:
            return names
    return [f"block{i + 1}" for i in range(count)]


@dataclass(frozen=True)
class BoundaryShape:
    """The tensor shape (without batch) leaving a block: channels plus spatial dims (empty if flat)."""

    shape: tuple[int, ...]

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.shape[1:]

    def __str__(self) -> str:
        return "x".join(str(s) for s in self.shape)


def trace_boundaries(
    model: nn.Module, blocks: Sequence[nn.Module], sample: torch.Tensor, *, role: str
) -> list[BoundaryShape]:
    """Run the blocks on ``sample`` and return each block's output shape (block l+1's input is block l's output).

    Also checks that the composition equals ``model(sample)``, so grafting trains the real network.
    """
    was_training = model.training
    model.eval()
    outputs: list[BoundaryShape] = []
    try:
        with torch.no_grad():
            x = sample
            for index, block in enumerate(blocks):
                try:
                    x = block(x)
                except Exception as exc:
                    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    glue = ("; the previous block's output does not fit it: if the model's forward does something "
                            "between blocks (flatten, pooling), put that glue inside a block, e.g. "
                            "nn.Sequential(nn.Flatten(), head)") if index > 0 and isinstance(exc, RuntimeError) else ""
                    raise GraftkdError(
                        f"{role} block {index + 1} failed on an input of shape {tuple(x.shape)}: {detail}{glue}"
                    ) from exc
                if not isinstance(x, torch.Tensor):
                    raise GraftkdError(f"{role} block {index + 1} must return one tensor, got {type(x).__name__}")
                outputs.append(BoundaryShape(tuple(x.shape[1:])))
            try:
                reference = model(sample)
            except Exception as exc:
                raise GraftkdError(f"the {role} failed on a dummy input of shape {tuple(sample.shape)}: {exc}") from exc
            if isinstance(reference, torch.Tensor) and not bool(torch.isfinite(reference).all()):
                raise GraftkdError(
                    f"the {role} outputs NaN or inf on a dummy input of shape {tuple(sample.shape)}: its weights are "
                    "damaged (or were saved after training diverged); check the weights file"
                )
            if not isinstance(reference, torch.Tensor) or reference.shape != x.shape or not torch.allclose(
                reference, x, atol=1e-5, rtol=1e-4
            ):
                raise GraftkdError(
                    f"the {role}'s forward is not the composition of its {len(blocks)} blocks "
                    f"(model output {tuple(getattr(reference, 'shape', ()))} vs blocks {tuple(x.shape)}): "
                    "put forward glue such as flatten or pooling inside a block, e.g. "
                    "nn.Sequential(nn.Flatten(), head)"
                )
    finally:
        model.train(was_training)
    return outputs


def same_architecture(a: nn.Module, b: nn.Module) -> bool:
    """True when two blocks have identical structure and parameter shapes (weights may differ)."""
    if repr(a) != repr(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
