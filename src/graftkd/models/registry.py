"""Name -> constructor registry, so configs and the CLI can name architectures as strings."""
from __future__ import annotations

import difflib
import inspect
from typing import Callable

import torch.nn as nn

from graftkd.errors import GraftkdError

ModelFactory = Callable[..., nn.Module]

#: Every zoo architecture by name; filled by ``@register_model`` when ``graftkd.models`` is imported.
MODEL_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: make ``fn(num_classes=..., **kwargs) -> nn.Module`` buildable as ``name``."""
    key = name.strip().lower()

    def decorator(fn: ModelFactory) -> ModelFactory:
        old = MODEL_REGISTRY.get(key)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"model name {key!r} is already registered by {old.__module__}.{old.__qualname__}")
        MODEL_REGISTRY[key] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """All registered architecture names, sorted."""
    return sorted(MODEL_REGISTRY)


def build_model(name: str, num_classes: int = 10, **kwargs: object) -> nn.Module:
    """Build a fresh (randomly initialised) zoo model by name.

    The returned module has ``blocks()`` / ``block_names()`` (the grafting contract) and an
    ``input_shape`` attribute (C, H, W) giving its natural input size.
    """
    key = str(name).strip().lower()
    fn = MODEL_REGISTRY.get(key)
    if fn is None:
        close = difflib.get_close_matches(key, list_models(), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known models: {', '.join(list_models())}"
        raise GraftkdError(f"unknown model '{name}'; {hint}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise GraftkdError(f"model '{key}': num_classes must be a positive integer, got {num_classes!r}")
    try:
        inspect.signature(fn).bind(num_classes=num_classes, **kwargs)
    except TypeError as exc:
        allowed = [p for p in inspect.signature(fn).parameters if p != "num_classes"]
        raise GraftkdError(
            f"model '{key}' does not accept options {sorted(kwargs)} ({exc}); "
            f"allowed options: {', '.join(allowed) or 'none'}"
        ) from exc
    model = fn(num_classes=num_classes, **kwargs)
    model.zoo_name = key  # plain attribute: no state_dict key; used in error messages
    return model
