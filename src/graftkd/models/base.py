"""The block contract every zoo model follows, so grafting can swap blocks between teacher and student.

``model(x)`` is *defined* as ``for b in model.blocks(): x = b(x)``: ``forward`` below runs exactly those
module calls in that order, so composition is bitwise equal to the model by construction. Blocks that are not one existing
submodule are ``nn.Sequential`` views built on the fly over existing submodules (never assigned as
attributes, so ``state_dict`` keys and parameters stay those of the model). Parameter-free glue
(ReLU, pooling, Flatten) lives in blocks as modules, kept as attributes of the model so that both a
block and the whole model can be traced with ``torch.fx.symbolic_trace``.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class BlockModel(nn.Module):
    """Base class: subclasses implement ``block_parts()`` and ``block_names()``; forward composes the blocks."""

    #: natural input size (C, H, W), used by tests, FLOP counting and the CLI.
    input_shape: tuple[int, int, int] = (3, 32, 32)

    def block_parts(self) -> list[list[nn.Module]]:
        """For each block, the existing submodules it chains, in order (subclasses implement this)."""
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The L blocks, in order; ``model(x)`` equals applying them one after the other.

        A block of one part is that submodule itself; longer ones are fresh ``nn.Sequential`` views
        (shared parameters, not registered, so ``state_dict`` keys do not change).
        """
        return [parts[0] if len(parts) == 1 else nn.Sequential(*parts) for parts in self.block_parts()]

    def block_names(self) -> list[str]:
        """Human-readable names of the blocks, same length and order as ``blocks()``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- stages (feature distillation)
    def stage_parts(self) -> list[list[nn.Module]]:
        """A finer cut of the same forward for feature distillers and SAKD's spots.

        Stage i's output is feature i. The next-to-last stage ends with the pooled, flattened
        embedding and the last stage is the classifier (its output: the logits). Every grafting block
        boundary is also a stage boundary, so grafting and the distillers see the same spots. The last
        part of each stage must be a module called exactly once per forward, so a forward hook on it
        sees that stage's output. Default: the blocks themselves (models written for grafting only).
        """
        return self.block_parts()

    def stage_names(self) -> list[str]:
        return self.block_names()

    def _stem_layers_head(self, layers: int, head: str) -> list[list[nn.Module]]:
        """Stages of ResNet-shaped models: conv1-bn1-relu, layer1..layerN, avgpool-flatten, ``head``."""
        return ([[self.conv1, self.bn1, self.relu]] + [[getattr(self, f"layer{i}")] for i in range(1, layers + 1)]
                + [[self.avgpool, self.flatten], [getattr(self, head)]])

    def _stem_layers_head_names(self, layers: int, head: str) -> list[str]:
        return ["stem"] + [f"layer{i}" for i in range(1, layers + 1)] + ["pool", head]

    def stages(self) -> list[nn.Module]:
        return [parts[0] if len(parts) == 1 else nn.Sequential(*parts) for parts in self.stage_parts()]

    def feature_paths(self) -> list[str]:
        """Module paths whose forward outputs are features f_0 .. f_{n-1} (all stages but the classifier)."""
        names = {id(m): n for n, m in self.named_modules()}
        return [names[id(parts[-1])] for parts in self.stage_parts()[:-1]]

    def run_stages(self, x: torch.Tensor, begin: int, end: int) -> torch.Tensor:
        """Stages ``begin`` .. ``end`` (inclusive) of the forward, for routing between two networks."""
        for parts in self.stage_parts()[begin : end + 1]:
            for part in parts:
                x = part(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same calls, same order as composing ``blocks()`` (``nn.Sequential`` just loops over its
        # parts), but every module called is registered, so the whole model is fx-traceable too.
        for parts in self.block_parts():
            for part in parts:
                x = part(x)
        return x


def check_block_contract(model: nn.Module, x: torch.Tensor) -> None:
    """Raise AssertionError unless ``model(x)`` equals the composition of its blocks bitwise.

    Runs in eval mode (batch-norm statistics must not change between the two passes) and restores the
    previous train/eval mode of every submodule afterwards.
    """
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        blocks = model.blocks()  # type: ignore[operator]
        names = model.block_names()  # type: ignore[operator]
        assert len(blocks) == len(names), f"{len(blocks)} blocks but {len(names)} block names"
        with torch.no_grad():
            full = model(x)
            y = x
            for block in blocks:
                y = block(y)
        assert torch.equal(full, y), "model(x) differs from the composition of its blocks"
    finally:
        for m, mode in modes.items():
            m.training = mode


def check_stage_contract(model: nn.Module, x: torch.Tensor) -> list[torch.Size]:
    """Raise AssertionError unless the stages compose to ``model(x)`` bitwise and hooks see each stage.

    Returns the feature shapes f_0 .. f_{n-1} (batch included). Eval mode; modes restored afterwards.
    """
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        stages = model.stages()  # type: ignore[operator]
        assert len(stages) == len(model.stage_names()) >= 2, "need named stages, the classifier last"  # type: ignore[operator]
        seen: dict[str, list[torch.Tensor]] = {}
        handles = [model.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: seen.setdefault(p, []).append(o))
                   for p in model.feature_paths()]  # type: ignore[operator]
        try:
            with torch.no_grad():
                full = model(x)
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            y, outputs = x, []
            for stage in stages:
                y = stage(y)
                outputs.append(y)
        assert torch.equal(full, y), "model(x) differs from the composition of its stages"
        for path, out in zip(model.feature_paths(), outputs):  # type: ignore[operator]
            assert len(seen.get(path, [])) == 1, f"module '{path}' ran {len(seen.get(path, []))} times in one forward"
            assert torch.equal(seen[path][0], out), f"the hook on '{path}' does not see its stage's output"
        assert outputs[-2].dim() == 2, "the next-to-last stage must end with the flattened embedding"
        return [o.shape for o in outputs[:-1]]
    finally:
        for m, mode in modes.items():
            m.training = mode
