"""Decoding image files (PNG, JPEG, WebP, BMP) into one uint8 tensor, with size checks and bad-file policy.

Used by the folder, archive and unlabeled-folder readers. Decoding can optionally run in worker
processes (``workers > 0``); the result is identical either way.
"""
from __future__ import annotations

import io
import re
import warnings
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Iterable

import numpy as np
import torch
from PIL import Image

from graftkd.errors import GraftkdError

__all__ = ["IMAGE_EXTENSIONS", "is_image_name", "decode_image", "ImageCollector", "decode_stream"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BAD_IMAGE_POLICIES = ("error", "skip")


def is_image_name(name: str) -> bool:
    """True for a file name with an image extension that is not hidden (``.x``, ``._x`` AppleDouble)."""
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def looked_for() -> str:
    return ", ".join("*" + e for e in IMAGE_EXTENSIONS)


def check_policy(on_bad_image: str) -> None:
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise GraftkdError(f"on_bad_image must be 'error' or 'skip' (got {on_bad_image!r})")


_FORMAT_OF = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}


def format_hint(name: str) -> str | None:
    """Pillow format name expected from a file's extension (used to skip format sniffing)."""
    dot = name.rfind(".")
    return _FORMAT_OF.get(name[dot:].lower()) if dot >= 0 else None


def decode_image(data: bytes, grayscale: bool = False, hint: str | None = None) -> np.ndarray:
    """Decode one encoded image to uint8 ``(H, W, 3)`` RGB, or ``(H, W, 1)`` when ``grayscale``.

    ``hint`` (a Pillow format such as ``"WEBP"``) makes opening about twice as fast; a file whose
    content does not match its extension is still decoded (second attempt without the hint).
    Raises whatever Pillow raises for unreadable or truncated data; callers turn that into a
    ``GraftkdError`` naming the file.
    """
    if hint is not None:
        try:
            im = Image.open(io.BytesIO(data), formats=[hint])
        except Exception:  # content does not match the extension: sniff the format instead
            im = Image.open(io.BytesIO(data))
    else:
        im = Image.open(io.BytesIO(data))
    with im:
        im.load()  # force full decode: truncated files fail here, not later
        mode = "L" if grayscale else "RGB"
        if im.mode != mode:
            im = im.convert(mode)
        arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def _decode_chunk(items: list[tuple[str, bytes]], grayscale: bool) -> list[tuple[str, np.ndarray | str]]:
    """Worker-side: decode a chunk; failures are returned as error strings (never raised)."""
    out: list[tuple[str, np.ndarray | str]] = []
    for rel, data in items:
        try:
            out.append((rel, decode_image(data, grayscale, format_hint(rel))))
        except Exception as exc:  # Pillow raises many types for corrupt data
            out.append((rel, _describe(exc)))
    return out


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ImageCollector:
    """Accumulates decoded images for one set: equal-size check, bad-image policy, final stacking.

    ``where`` names the source (folder or archive) in messages. Images are added with a sort key
    (``(class_index_or_name, relative_path)``) and stacked in sorted-key order by ``finish``.
    """

    def __init__(self, where: str, grayscale: bool = False, on_bad_image: str = "error"):
        check_policy(on_bad_image)
        self.where = where
        self.grayscale = grayscale
        self.on_bad_image = on_bad_image
        self.keys: list[tuple] = []
        self.arrays: list[np.ndarray] = []
        self.skipped: list[str] = []
        self.rels: list[str] = []

    def bad(self, rel: str, reason: str) -> None:
        # Pillow names the in-memory buffer ("cannot identify image file <_io.BytesIO object at 0x...>")
        reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", reason)
        if self.on_bad_image == "error":
            raise GraftkdError(
                f"cannot read image {rel} in {self.where} ({reason}); fix or delete the file, "
                "or skip unreadable images with --on-bad-image skip (on_bad_image='skip' in Python)"
            )
        self.skipped.append(rel)

    def add(self, key: tuple, rel: str, arr: np.ndarray | str) -> None:
        if isinstance(arr, str):
            self.bad(rel, arr)
            return
        self.keys.append(key)
        self.rels.append(rel)
        self.arrays.append(arr)

    def add_bytes(self, key: tuple, rel: str, data: bytes) -> None:
        try:
            arr: np.ndarray | str = decode_image(data, self.grayscale, format_hint(rel))
        except Exception as exc:
            arr = _describe(exc)
        self.add(key, rel, arr)

    def warn_skipped(self) -> None:
        if self.skipped:
            shown = ", ".join(self.skipped[:3]) + (", ..." if len(self.skipped) > 3 else "")
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable image(s) in {self.where}: {shown}",
                stacklevel=3,
            )

    def _check_sizes(self, order: list[int]) -> None:
        # The reference size is the most common one (ties: the first file in sorted order), not the
        # first file decoded: a damaged header can decode to a valid image of another size, and the
        # message must name that file rather than every healthy one after it.
        sizes = [(int(self.arrays[i].shape[1]), int(self.arrays[i].shape[0])) for i in order]
        counts = Counter(sizes)
        if len(counts) == 1:
            return
        ref = max(counts, key=lambda size: (counts[size], -sizes.index(size)))
        odd = [(self.rels[i], size) for i, size in zip(order, sizes) if size != ref]
        shown = ", ".join(f"{rel} is {w}x{h}" for rel, (w, h) in odd[:3]) + (", ..." if len(odd) > 3 else "")
        raise GraftkdError(
            f"image size mismatch in {self.where}: {len(odd)} of {len(sizes)} images differ from the common "
            f"size {ref[0]}x{ref[1]} ({shown}); resize your images to one size or remove the odd ones"
        )

    def finish(self) -> tuple[torch.Tensor, list[tuple]]:
        """``(images uint8 (N, C, H, W), sorted keys)``; raises if nothing was decoded."""
        if not self.arrays:
            raise GraftkdError(f"no readable images in {self.where} (looked for {looked_for()})")
        order = sorted(range(len(self.keys)), key=self.keys.__getitem__)
        self._check_sizes(order)
        stacked = np.stack([self.arrays[i] for i in order])  # (N, H, W, C)
        self.arrays = []
        images = torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()
        return images, [self.keys[i] for i in order]


def decode_stream(
    collector: ImageCollector,
    items: Iterable[tuple[tuple, str, bytes]],
    workers: int = 0,
    chunk: int = 256,
) -> None:
    """Decode ``(key, rel, bytes)`` items into ``collector``, in-process or with ``workers`` processes.

    With workers, results are added in submission order, so size errors name the same file either
    way; at most ``4 * workers`` chunks are in flight to bound memory.
    """
    if workers <= 0:
        for key, rel, data in items:
            collector.add_bytes(key, rel, data)
        return
    keys_of: dict[int, list[tuple]] = {}
    pending: list[tuple[int, Future]] = []
    pool = ProcessPoolExecutor(max_workers=workers)
    try:

        def drain(limit: int) -> None:
            while len(pending) > limit:
                cid, fut = pending.pop(0)
                for key, (rel, arr) in zip(keys_of.pop(cid), fut.result()):
                    collector.add(key, rel, arr)

        batch: list[tuple[str, bytes]] = []
        batch_keys: list[tuple] = []
        cid = 0
        for key, rel, data in items:
            batch.append((rel, data))
            batch_keys.append(key)
            if len(batch) >= chunk:
                keys_of[cid] = batch_keys
                pending.append((cid, pool.submit(_decode_chunk, batch, collector.grayscale)))
                cid += 1
                batch, batch_keys = [], []
                drain(4 * workers)
        if batch:
            keys_of[cid] = batch_keys
            pending.append((cid, pool.submit(_decode_chunk, batch, collector.grayscale)))
        drain(0)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)

