"""Decoded-once cache for image sets read from archives and folders.

Decoding 60,000 WebP files takes tens of seconds; the decoded uint8 tensors, labels, class names and
relative paths are saved once under the cache directory (``$GRAFTKD_CACHE``, else
``$XDG_CACHE_HOME/graftkd``, else ``~/.cache/graftkd``) and loaded with ``torch.load(weights_only=True)``.

Keys: an archive is keyed by its sha256 (hashed in chunks, memoised per path/size/mtime in this
process); a folder by a hash of its sorted relative image paths, sizes and modification times. The
split, grayscale flag and bad-image policy are part of the key. A cache that cannot be written (read-only
home) or read (corrupt file) only costs a warning and a fresh decode.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from graftkd.files import atomic_torch_save

__all__ = ["cache_dir", "file_sha256", "folder_fingerprint", "cached_payload", "CACHE_FORMAT"]

CACHE_FORMAT = 1
_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def cache_dir() -> Path:
    """The graftkd cache root (not created here)."""
    env = os.environ.get("GRAFTKD_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "graftkd"
    return Path.home() / ".cache" / "graftkd"


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks; memoised on (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    memo_key = (str(p), st.st_size, st.st_mtime_ns)
    if memo_key in _SHA_MEMO:
        return _SHA_MEMO[memo_key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while True:
            block = f.read(chunk_size)
            if not block:
                break
            h.update(block)
    digest = h.hexdigest()
    _SHA_MEMO[memo_key] = digest
    return digest


def folder_fingerprint(root: str | os.PathLike, relpaths: list[str]) -> str:
    """Hash of sorted ``relative path, size, mtime_ns`` lines of the given files under ``root``."""
    root = Path(root)
    h = hashlib.sha256()
    for rel in sorted(relpaths):
        st = (root / rel).stat()
        h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.")[:40] or "set"


def cache_file(label: str, key_parts: list[str]) -> Path:
    key = hashlib.sha256(("|".join(key_parts) + f"|v{CACHE_FORMAT}").encode()).hexdigest()
    return cache_dir() / "datasets" / f"{_slug(label)}-{key[:24]}.pt"


def _valid(payload: Any) -> bool:
    if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
        return False
    images = payload.get("images")
    labels = payload.get("labels")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        return False
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],)):
        return False
    return all(isinstance(payload.get(k), list) for k in ("classes", "paths", "skipped"))


def cached_payload(
    label: str, key_parts: list[str], build: Callable[[], dict], use_cache: bool = True
) -> tuple[dict, bool]:
    """Return ``(payload, hit)``: the cached payload for the key, or ``build()`` saved to the cache.

    ``payload`` is ``{"images", "labels", "classes", "paths", "skipped"}``; ``hit`` tells whether it
    came from the cache.
    """
    if not use_cache:
        return build(), False
    path = cache_file(label, key_parts)
    if path.is_file():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if _valid(payload):
                return payload, True
            warnings.warn(f"ignoring stale or malformed cache file {path}; decoding again", stacklevel=3)
        except Exception as exc:
            warnings.warn(f"ignoring unreadable cache file {path} ({type(exc).__name__}); decoding again", stacklevel=3)
    payload = build()
    payload = {"format": CACHE_FORMAT, **payload}
    try:
        atomic_torch_save(path, payload)
    except OSError as exc:
        warnings.warn(
            f"could not write the dataset cache {path} ({exc}); set GRAFTKD_CACHE to a writable folder "
            "to avoid decoding again next time",
            stacklevel=3,
        )
    return payload, False
