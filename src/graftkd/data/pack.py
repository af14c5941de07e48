"""Image packs: named splits as uint8 tensors in one ``.pt`` file, a dataset spec like any other.

A pack carries exactly what a run needs to a machine without the archives (a lent GPU, a cluster node):
the test split, and the few-shot images of the draws to run with manifests pointing into it. The pixels are
the source's, so ``ImageSet.content_sha256`` of a packed split equals the source split's, and a run on the
pack records the same few-shot images and test set as one on the archive.

    {"format": "graftkd-pack/1", "meta": {...},
     "splits": {"test": {"images": uint8 (N, C, H, W), "labels": int64 (N,) | None, "classes": [...],
                         "name": "cifar10/test", "dataset": "cifar10", "source_indices": [...] | None}}}

``source_indices``: for a split that holds only some of its source's images, their indices there.

A compressed pack (``graftkd-pack/2``, ``save_pack(..., compress=True)``) stores a split's pixels losslessly as
``"images_zlib"`` (each row's left-neighbour differences, mod 256, deflated: PNG's Sub filter) with ``"shape"``
instead of ``"images"``: the CIFAR-10 test split is 23.9 MB instead of 30.8 (``benchmarks/pack_size.py``), which lets it travel with the 30 MB
VGG16-BN teacher in one 64 MiB device call. Reading gives the same uint8 tensor either way.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import torch

from graftkd.data.dataset import ImageSet
from graftkd.errors import GraftkdError
from graftkd.files import atomic_torch_save

PACK_FORMAT = "graftkd-pack/1"
COMPRESSED_FORMAT = "graftkd-pack/2"  # the same, with pixels stored as "images_zlib" + "shape"
FORMATS = (PACK_FORMAT, COMPRESSED_FORMAT)


def compress_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., W) images as deflated bytes of their left-neighbour differences (mod 256), a uint8 tensor."""
    rows = images.contiguous().clone()
    rows[..., 1:] -= images[..., :-1]  # uint8 arithmetic wraps mod 256
    return torch.frombuffer(bytearray(zlib.compress(rows.numpy().tobytes(), 9)), dtype=torch.uint8)


def decompress_images(data: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The inverse of :func:`compress_images`: the exact uint8 images of ``shape``."""
    rows = torch.frombuffer(bytearray(zlib.decompress(data.numpy().tobytes())), dtype=torch.uint8).reshape(shape)
    return rows.to(torch.int32).cumsum(-1).remainder(256).to(torch.uint8)


def save_pack(path: str | os.PathLike, splits: dict[str, ImageSet], meta: dict | None = None,
              source_indices: dict[str, list[int]] | None = None, compress: bool = False) -> Path:
    """Write ``splits`` to ``path`` atomically; ``source_indices[name]`` marks a split as a subset of its source;
    ``compress`` stores the pixels deflated (lossless, format ``graftkd-pack/2``)."""
    source_indices = source_indices or {}

    def pixels(images: torch.Tensor) -> dict:
        if not compress:
            return {"images": images}
        return {"images_zlib": compress_images(images), "shape": list(images.shape)}

    payload = {"format": COMPRESSED_FORMAT if compress else PACK_FORMAT, "meta": dict(meta or {}), "splits": {
        name: {**pixels(s.images), "labels": s.labels, "classes": list(s.classes), "name": s.name,
               "dataset": s.dataset, "source_indices": source_indices.get(name)} for name, s in splits.items()}}
    return atomic_torch_save(path, payload)


def read_pack(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign .pt file
        raise GraftkdError(f"{path} is not a readable image pack ({type(exc).__name__}: {exc}); write one with "
                           "graftkd.data.pack.save_pack") from None
    if not isinstance(payload, dict) or payload.get("format") not in FORMATS:
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
    images = s["images"] if "images" in s else decompress_images(s["images_zlib"], s["shape"])
    return ImageSet(images, s["labels"], s["classes"], s["name"], dataset=s["dataset"])


def is_pack_path(path: Path) -> bool:
    return path.suffix == ".pt"
