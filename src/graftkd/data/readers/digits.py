"""scikit-learn's embedded 8x8 digits, split deterministically (no download)."""
from __future__ import annotations

import functools

import numpy as np
import torch

from graftkd.data.dataset import ImageSet
from graftkd.data.readers.common import _check_split
from graftkd.errors import GraftkdError


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    data = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    target = np.asarray(bunch.target, dtype=np.int64)
    images = torch.from_numpy(np.rint(data * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)).unsqueeze(1)
    return images, torch.from_numpy(target)


def load_digits(split: str = "train", seed: int = 0, train_fraction: float = 0.7) -> ImageSet:
    """The 1,797 real 8x8 handwritten digits shipped with scikit-learn, as uint8 ``(N, 1, 8, 8)``.

    Pixel values 0..16 are scaled to 0..255 (``round(v * 255 / 16)``). The train/test split is a fixed
    stratified split (``train_fraction`` of each class to train, seeded, deterministic); images keep
    the original dataset order within each split.
    """
    _check_split(split)
    if not 0.0 < train_fraction < 1.0:
        raise GraftkdError(f"train_fraction must be between 0 and 1 (got {train_fraction})")
    images, labels = _digits_arrays()
    g = torch.Generator().manual_seed(int(seed))
    train_idx: list[int] = []
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        perm = idx[torch.randperm(idx.numel(), generator=g)]
        n_train = int(round(train_fraction * idx.numel()))
        train_idx.extend(perm[:n_train].tolist())
    mask = torch.zeros(labels.numel(), dtype=torch.bool)
    mask[torch.tensor(train_idx, dtype=torch.int64)] = True
    keep = mask if split == "train" else ~mask
    sel = torch.nonzero(keep).flatten()
    return ImageSet(
        images[sel].contiguous(),
        labels[sel].contiguous(),
        [str(i) for i in range(10)],
        f"digits/{split}",
        dataset="digits",
    )
