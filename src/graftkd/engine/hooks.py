"""Features by module path, taken with forward hooks: models are never rewritten to expose them."""
from __future__ import annotations

import torch
from torch import nn

from graftkd.errors import GraftkdError


def find_module(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that lists the valid paths nearby."""
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n and "." not in n]
        raise GraftkdError(
            f"{type(model).__name__} has no module '{path}'; top-level modules: {', '.join(names)}"
        ) from None


class FeatureTap:
    """Context manager recording the outputs of the modules at ``paths`` on every forward."""

    def __init__(self, model: nn.Module, paths: list[str] | tuple[str, ...]) -> None:
        self.model = model
        self.paths = list(paths)
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "FeatureTap":
        for path in self.paths:
            module = find_module(self.model, path)
            self._handles.append(module.register_forward_hook(self._recorder(path)))
        return self

    def _recorder(self, path: str):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.features[path] = output

        return record

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.features.clear()
