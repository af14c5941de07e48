"""The one in-memory image container used everywhere in graftkd: ``ImageSet``.

Images are kept as a single uint8 tensor ``(N, C, H, W)``; conversion to float and normalisation
happen batch-wise on the device (see ``graftkd.data.normalize.Normalizer``), so a whole CIFAR split
costs 150 MB of memory and no per-image Python work at training time.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

from graftkd.errors import GraftkdError

__all__ = ["ImageSet", "as_index_tensor"]


def as_index_tensor(indices, length: int, what: str = "index") -> torch.Tensor:
    """Turn a list / array / tensor of indices into an int64 CPU tensor, checking ``0 <= i < length``."""
    if isinstance(indices, torch.Tensor):
        idx = indices.detach().to("cpu")
        if idx.dtype == torch.bool:
            if idx.numel() != length:
                raise GraftkdError(f"boolean mask has {idx.numel()} entries but the set has {length} images")
            idx = idx.nonzero().flatten()
    else:
        arr = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices)
        if arr.dtype == np.bool_:
            if arr.size != length:
                raise GraftkdError(f"boolean mask has {arr.size} entries but the set has {length} images")
            arr = np.flatnonzero(arr)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if not np.issubdtype(arr.dtype, np.integer):
            raise GraftkdError(f"{what} values must be integers (got dtype {arr.dtype})")
        idx = torch.from_numpy(arr.astype(np.int64, copy=False).reshape(-1))
    if idx.is_floating_point() or idx.is_complex():
        raise GraftkdError(f"{what} values must be integers (got dtype {idx.dtype})")
    idx = idx.to(torch.int64).reshape(-1)
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= length:
            bad = lo if lo < 0 else hi
            raise GraftkdError(
                f"{what} {bad} is out of range for a set of {length} images; "
                f"use indices 0..{length - 1}"
            )
    return idx


@dataclass
class ImageSet:
    """A set of same-sized images in memory.

    ``images``: uint8 ``(N, C, H, W)``, contiguous. ``labels``: int64 ``(N,)`` or ``None`` for unlabeled
    sets. ``classes``: class names in label-index order (``[]`` if unknown). ``name``: a human-readable
    origin such as ``"cifar10/train"`` or a folder path. ``paths``: per-image path relative to the
    source root (folders and archives) or ``None``. ``skipped``: relative paths of unreadable images
    that were skipped (``on_bad_image="skip"``). ``dataset``: the known dataset family
    (``"cifar10"``, ``"cifar100"``, ``"digits"``) when recognised, used to pick normalisation stats.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str]
    name: str
    paths: list[str] | None = None
    skipped: list[str] = field(default_factory=list)
    dataset: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            got = (
                f"{self.images.dtype} {tuple(self.images.shape)}"
                if isinstance(self.images, torch.Tensor)
                else type(self.images).__name__
            )
            raise GraftkdError(f"ImageSet {self.name!r}: images must be a uint8 (N, C, H, W) tensor (got {got})")
        if self.images.device.type != "cpu":
            self.images = self.images.cpu()
        if not self.images.is_contiguous():
            self.images = self.images.contiguous()
        n = self.images.shape[0]
        if self.labels is not None:
            if not isinstance(self.labels, torch.Tensor):
                self.labels = torch.as_tensor(self.labels)
            if self.labels.dim() != 1 or self.labels.shape[0] != n:
                raise GraftkdError(
                    f"ImageSet {self.name!r}: labels must have shape ({n},) (got {tuple(self.labels.shape)})"
                )
            if self.labels.is_floating_point():
                raise GraftkdError(f"ImageSet {self.name!r}: labels must be integers (got {self.labels.dtype})")
            self.labels = self.labels.to(device="cpu", dtype=torch.int64).contiguous()
            if n and int(self.labels.min()) < 0:
                raise GraftkdError(f"ImageSet {self.name!r}: labels must be >= 0 (got {int(self.labels.min())})")
            if self.classes and n and int(self.labels.max()) >= len(self.classes):
                raise GraftkdError(
                    f"ImageSet {self.name!r}: label {int(self.labels.max())} but only "
                    f"{len(self.classes)} class names"
                )
        self.classes = [str(c) for c in self.classes]
        if self.paths is not None:
            self.paths = list(self.paths)
            if len(self.paths) != n:
                raise GraftkdError(f"ImageSet {self.name!r}: {len(self.paths)} paths for {n} images")
        self.skipped = list(self.skipped)

    # ------------------------------------------------------------------ basic facts
    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        lab = "unlabeled" if self.labels is None else f"{self.num_classes} classes"
        return f"ImageSet({self.name!r}, {len(self)} images, {tuple(self.image_shape)}, {lab})"

    @property
    def num_classes(self) -> int:
        """Number of classes: ``len(classes)`` if names are known, else ``max(label) + 1``, else 0."""
        if self.classes:
            return len(self.classes)
        if self.labels is not None and self.labels.numel():
            return int(self.labels.max()) + 1
        return 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def num_skipped(self) -> int:
        """How many unreadable images were skipped while loading (``on_bad_image="skip"``)."""
        return len(self.skipped)

    @property
    def is_labeled(self) -> bool:
        return self.labels is not None

    def class_counts(self) -> list[int]:
        """Images per class in label-index order (requires labels)."""
        if self.labels is None:
            raise GraftkdError(f"{self.name}: the set has no labels, so there are no class counts")
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    # ------------------------------------------------------------------ derived sets
    def content_sha256(self) -> str:
        """sha256 of the image bytes, then the label bytes (if any): identifies the exact evaluation data."""
        import hashlib

        h = hashlib.sha256()
        h.update(str(tuple(self.images.shape)).encode())
        h.update(self.images.contiguous().numpy().tobytes())
        if self.labels is not None:
            h.update(self.labels.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()

    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray, name: str | None = None) -> "ImageSet":
        """A new set with the images at ``indices`` (in that order); labels, paths and classes follow."""
        idx = as_index_tensor(indices, len(self))
        return ImageSet(
            images=self.images.index_select(0, idx).contiguous(),
            labels=None if self.labels is None else self.labels.index_select(0, idx),
            classes=list(self.classes),
            name=name if name is not None else self.name,
            paths=None if self.paths is None else [self.paths[i] for i in idx.tolist()],
            skipped=[],
            dataset=self.dataset,
        )

    def drop_labels(self) -> "ImageSet":
        """The same images without labels (class names are kept: they describe the label space)."""
        return replace(self, labels=None, skipped=list(self.skipped))
