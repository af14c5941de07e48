"""Image packs: named splits as uint8 tensors in one ``.pt`` file, a dataset spec like any other.

A pack carries exactly what a run needs to a machine without the archives (a lent GPU, a cluster node):
the test split, and the few-shot images of the draws to run with manifests pointing into it. The pixels are
the source's, so ``ImageSet.content_sha256`` of a packed split equals the source split's, and a run on the
pack records the same few-shot images and test set as one on the archive.

    {"format": "graftkd-pack/1", "meta": {...},
     "splits": {"test": {"images": uint8 (N, C, H, W), "labels": int64 (N,) | None, "classes": [...],
                         "name": "cifar10/test", "dataset": "cifar10", "source_indices": [...] | None}}}

``source_indices``: for a split that holds only some of its source's images, their indices there.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from graftkd.data.dataset import ImageSet
from graftkd.errors import GraftkdError
from graftkd.files import atomic_torch_save

PACK_FORMAT = "graftkd-pack/1"


def save_pack(path: str | os.PathLike, splits: dict[str, ImageSet], meta: dict | None = None,
              source_indices: dict[str, list[int]] | None = None) -> Path:
    """Write ``splits`` to ``path`` atomically; ``source_indices[name]`` marks a split as a subset of its source."""
    source_indices = source_indices or {}
    payload = {"format": PACK_FORMAT, "meta": dict(meta or {}), "splits": {
        name: {"images": s.images, "labels": s.labels, "classes": list(s.classes), "name": s.name,
               "dataset": s.dataset, "source_indices": source_indices.get(name)} for name, s in splits.items()}}
    return atomic_torch_save(path, payload)


def read_pack(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign .pt file
        raise GraftkdError(f"{path} is not a readable image pack ({type(exc).__name__}: {exc}); write one with "
                           "graftkd.data.pack.save_pack") from None
    if not isinstance(payload, dict) or payload.get("format") != PACK_FORMAT:
        raise GraftkdError(f"{path} is a .pt file but not an image pack (format {PACK_FORMAT!r}); a model file "
                           "goes to --teacher-weights / --weights, not to a data option")
    return payload


def load_pack(path: str | os.PathLike, split: str | None) -> ImageSet:
    """One split of a pack as an ImageSet."""
    payload = read_pack(path)
    splits = payload["splits"]
    if split not in splits:
        raise GraftkdError(f"{path} has no split {split!r}: it holds {', '.join(sorted(splits)) or 'none'}")
    s = splits[split]
    return ImageSet(s["images"], s["labels"], s["classes"], s["name"], dataset=s["dataset"])


def is_pack_path(path: Path) -> bool:
    return path.suffix == ".pt"
