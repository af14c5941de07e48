"""What the readers share: split names, reading files with a clear error, finishing a collection, and
the dataset family an archive or folder name says."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from graftkd.data.images import ImageCollector
from graftkd.errors import GraftkdError


def _check_split(split: str, allowed=("train", "test")) -> None:
    if split not in allowed:
        raise GraftkdError(f"unknown split {split!r}; use one of {', '.join(allowed)}")


def _read_files(root: Path, rels: list[str], keys: list[tuple]) -> Iterator[tuple[tuple, str, bytes]]:
    for key, rel in zip(keys, rels):
        try:
            data = (root / rel).read_bytes()
        except OSError as exc:
            raise GraftkdError(f"cannot read {root / rel} ({exc.strerror or exc}); check that the file is readable") from exc
        yield key, rel, data


def _finish(collector: ImageCollector, *, labeled: bool) -> dict:
    images, keys = collector.finish()
    collector.warn_skipped()
    return {
        "images": images,
        "labels": torch.tensor([k[0] for k in keys], dtype=torch.int64) if labeled else None,
        "paths": [k[-1] for k in keys],
        "skipped": list(collector.skipped),
    }


def _family(path: Path, num_classes: int) -> str | None:
    stem = path.name.lower()
    for suffix in (".tar.gz", ".tgz", ".tar.xz", ".tar.bz2", ".tar"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    expected = {"cifar10": 10, "cifar100": 100}
    return stem if expected.get(stem) == num_classes else None
