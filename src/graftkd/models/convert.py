"""Reading foreign checkpoint files into zoo models, with one-line errors a user can act on."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from graftkd.files import safe_torch_load
from graftkd.errors import GraftkdError

_SHOW = 3  # how many example keys an error message names
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Drop ``prefix`` from keys that start with it (DataParallel saves ``module.``-prefixed keys)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def to_float32(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Cast float16/bfloat16 tensors to float32 (files are stored in half precision to save space)."""
    return {
        k: (v.float() if isinstance(v, torch.Tensor) and v.dtype in (torch.float16, torch.bfloat16) else v)
        for k, v in state_dict.items()
    }


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a weights file: ``(float32 state_dict, other top-level entries such as mean/std/classes)``.

    Accepts a raw state_dict or a dict holding one under ``state_dict`` / ``model`` (also
    ``model_state_dict`` / ``net``). A ``.safetensors`` file is read without pickle; its metadata (and a
    ``model_config.json`` beside it, as ``graftkd export`` writes) give the extras.
    """
    if str(path).endswith(".safetensors"):
        return _read_safetensors(Path(path))
    obj = safe_torch_load(path)
    extras: dict[str, Any] = {}
    if _is_state_dict(obj):
        sd = obj
    else:
        sd = None
        if isinstance(obj, Mapping):
            for key in _WRAPPER_KEYS:
                if _is_state_dict(obj.get(key)):
                    sd = obj[key]
                    extras = {k: v for k, v in obj.items() if k != key}
                    break
        if sd is None:
            found = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else [type(obj).__name__]
            raise GraftkdError(
                f"{path}: no state_dict found (top-level entries: {', '.join(found)}); "
                "save the model's state_dict(), alone or under a 'state_dict' key"
            )
    return to_float32(sd), extras


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import importlib.util
    import json

    if importlib.util.find_spec("safetensors") is None:
        raise GraftkdError(f"{path} is a safetensors file but the safetensors package is not installed: "
                           "pip install safetensors")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            extras: dict[str, Any] = dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - a damaged file is the user's to fix
        raise GraftkdError(f"cannot read {path} as safetensors ({exc}); check the file") from exc
    config = path.with_name("model_config.json")
    if config.is_file():
        extras.update({k: v for k, v in json.loads(config.read_text()).items() if k in ("arch", "mean", "std", "classes")})
    return to_float32(sd), extras


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The float32 state_dict stored in ``path`` (raw, or under a ``state_dict``/``model`` key)."""
    return read_checkpoint(path)[0]


def _examples(keys: list[str]) -> str:
    more = f", ... (+{len(keys) - _SHOW})" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state_dict`` into ``model`` strictly; on mismatch raise one GraftkdError line.

    The message names ``source`` (file or description), the counts of missing / unexpected keys (and of
    shape mismatches) with a few examples of each. BN ``num_batches_tracked`` counters absent from old
    files (e.g. the akamaster ResNets) are filled with 0: they do not affect inference.
    """
    sd = dict(state_dict)
    own = model.state_dict()
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = torch.zeros_like(value)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and isinstance(sd[k], torch.Tensor) and sd[k].shape != own[k].shape
    ]
    arch = getattr(model, "zoo_name", type(model).__name__)
    if missing or unexpected:
        raise GraftkdError(
            f"cannot load {source} into {arch}: {len(missing)} missing keys"
            f"{' (' + _examples(missing) + ')' if missing else ''}, {len(unexpected)} unexpected keys"
            f"{' (' + _examples(unexpected) + ')' if unexpected else ''}; "
            "this checkpoint was made for another architecture; check --teacher-arch"
        )
    if mismatched:
        raise GraftkdError(
            f"cannot load {source} into {arch}: {len(mismatched)} tensors have the wrong shape "
            f"(file vs model: {_examples(mismatched)}); this checkpoint was made for another architecture "
            "or class count; check --teacher-arch and --num-classes"
        )
    model.load_state_dict(sd, strict=True)
    return model


# ---------------------------------------------------------------- NetGraft reference release (VGG16)

_BLOCKWISE = re.compile(r"^features\.(\d+)\.(\d+)\.(.+)$")
_FLAT = re.compile(r"^features\.(\d+)\.([A-Za-z_]+)$")


def detect_vgg_batch_norm(state_dict: Mapping[str, Any]) -> bool:
    """True when the VGG feature layers of ``state_dict`` include BatchNorm (running statistics)."""
    feature_keys = [k for k in strip_prefix(state_dict) if k.startswith("features.")]
    if not feature_keys:
        raise GraftkdError("not a VGG checkpoint: no 'features.*' keys; check --teacher-arch")
    return any(k.endswith(".running_var") or k.endswith(".running_mean") for k in feature_keys)


def _flat_to_blockwise(sd: dict[str, Any], batch_norm: bool) -> dict[str, Any]:
    """Map a flat ``features.<i>`` VGG (torchvision-like indices, pools inline) to ``features.<b>.<j>``.

    Parametric layers (conv, and BN when present) are matched in order; the block boundary is the
    max-pool, which shows up as a gap in the flat indices. Conv widths come from the weight shapes.
    """
    layers: dict[int, dict[str, Any]] = {}
    for key, value in sd.items():
        m = _FLAT.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    out = {k: v for k, v in sd.items() if not k.startswith("features.")}
    step = 3 if batch_norm else 2  # flat distance between consecutive convs inside a block
    block, pos, prev = 0, 0, None
    conv_indices = sorted(i for i, p in layers.items() if "weight" in p and p["weight"].dim() == 4)
    for i in conv_indices:
        if prev is not None:
            if i - prev == step:
                pos += step
            elif i - prev == step + 1:  # a max-pool sat between them: next block
                block, pos = block + 1, 0
            else:
                raise GraftkdError(f"unrecognised VGG layer indices near features.{i}; expected the NetGraft layout")
        for name, value in layers[i].items():
            out[f"features.{block}.{pos}.{name}"] = value
        if batch_norm:
            for name, value in layers.get(i + 1, {}).items():
                out[f"features.{block}.{pos + 1}.{name}"] = value
        prev = i
    return out


def from_netgraft_release(state_dict: Mapping[str, Any], batch_norm: bool | None = None) -> dict[str, Any]:
    """Map the NetGraft release's VGG16 (``vgg16-blockwise-cifar10.pth``) onto ``vgg16``/``vgg16_bn`` keys.

    The release uses our layout (``features.<block>.<layer>``, classifier Linear-BN1d-Linear at 0/1/2),
    so this is the identity up to a ``module.`` prefix; a flat ``features.<i>`` VGG is re-indexed
    block-wise. ``batch_norm=None`` detects it from the keys.
    """
    sd = strip_prefix(state_dict)
    if batch_norm is None:
        batch_norm = detect_vgg_batch_norm(sd)
    feature_keys = [k for k in sd if k.startswith("features.")]
    if not feature_keys:
        raise GraftkdError("not a VGG checkpoint: no 'features.*' keys; check --teacher-arch")
    if all(_BLOCKWISE.match(k) for k in feature_keys):
        return dict(sd)
    if all(_FLAT.match(k) for k in feature_keys):
        return _flat_to_blockwise(sd, batch_norm)
    raise GraftkdError(
        f"unrecognised VGG key layout (e.g. {feature_keys[0]}); expected features.<block>.<layer>.* "
        "as in the NetGraft release"
    )
