"""Labeled image folders (``<class>/<image>``), unlabeled folders and explicit file lists."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath

from graftkd.data.cache import cached_payload, folder_fingerprint
from graftkd.data.dataset import ImageSet
from graftkd.data.images import ImageCollector, check_policy, decode_stream, is_image_name, looked_for
from graftkd.data.readers.common import _family, _finish, _read_files
from graftkd.errors import GraftkdError


def list_images(root: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of all non-hidden image files under ``root`` (recursive), sorted."""
    root = Path(root)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
        rel_dir = Path(dirpath).relative_to(root)
        for fn in filenames:
            if is_image_name(fn):
                found.append((rel_dir / fn).as_posix())
    found.sort()
    return found


def load_image_folder(
    root: str | os.PathLike,
    split: str | None = None,
    *,
    grayscale: bool = False,
    on_bad_image: str = "error",
    workers: int = 0,
    cache: bool = False,
) -> ImageSet:
    """Read ``root/<split>/<class>/*.{png,jpg,jpeg,webp,bmp}`` (or ``root/<class>/...`` when ``split`` is None).

    Class index = alphabetical order of the class folder names; within a class, files are sorted by
    relative path (sub-folders of a class folder are included). Images are converted to RGB, or to
    one-channel "L" with ``grayscale``, and must all have the same size. ``on_bad_image="skip"``
    skips unreadable files (listed in ``ImageSet.skipped``, with a warning). ``cache`` stores the
    decoded set under the graftkd cache directory, keyed by paths, sizes and modification times.
    """
    check_policy(on_bad_image)
    root = Path(root).expanduser()
    base = root / split if split else root
    if not base.is_dir():
        if split and root.is_dir():
            have = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise GraftkdError(
                f"no split folder {split!r} in {root} (found: {', '.join(have) or 'none'}); "
                f"expected {root}/{split}/<class>/<image>"
            )
        raise GraftkdError(f"image folder not found: {base}; check the path")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")
    if not classes:
        raise GraftkdError(
            f"no class folders in {base}; expected {base}/<class>/<image> "
            "(for images without classes use load_unlabeled_folder)"
        )
    rels: list[str] = []
    keys: list[tuple] = []
    for ci, cls in enumerate(classes):
        files = list_images(base / cls)
        if not files:
            raise GraftkdError(
                f"class folder {base / cls} has no images (looked for {looked_for()}); add images or remove the folder"
            )
        for f in files:
            rel = f"{cls}/{f}"
            rels.append(rel)
            keys.append((ci, rel))

    def build() -> dict:
        collector = ImageCollector(str(base), grayscale, on_bad_image)
        decode_stream(collector, _read_files(base, rels, keys), workers)
        return {**_finish(collector, labeled=True), "classes": list(classes)}

    key_parts = ["folder", folder_fingerprint(base, rels), f"gray={grayscale}", f"bad={on_bad_image}"]
    payload, _ = cached_payload(f"folder-{base.name}", key_parts, build, cache)
    return ImageSet(
        payload["images"],
        payload["labels"],
        classes,
        str(base),
        paths=payload["paths"],
        skipped=payload["skipped"],
        dataset=_family(root, len(classes)),
    )


def load_unlabeled_folder(
    path: str | os.PathLike,
    *,
    grayscale: bool = False,
    on_bad_image: str = "error",
    workers: int = 0,
    cache: bool = False,
) -> ImageSet:
    """Read every image under ``path`` (recursively, hidden files skipped), sorted by relative path.

    Returns an ``ImageSet`` with ``labels=None``, ``classes=[]`` and ``paths`` = relative POSIX paths.
    Unreadable images raise a ``GraftkdError`` naming the file, or with ``on_bad_image="skip"`` are
    skipped, counted (``ImageSet.num_skipped``) and warned about.
    """
    check_policy(on_bad_image)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise GraftkdError(f"image folder not found: {root}; check the path")
    rels = list_images(root)
    if not rels:
        raise GraftkdError(f"no images found in {root} (looked for {looked_for()})")
    return load_image_files(root, rels, grayscale=grayscale, on_bad_image=on_bad_image, workers=workers, cache=cache)


def _check_relpath(rel: str, root: Path) -> Path:
    """Resolve ``root/rel``; refuse absolute paths and paths that escape ``root`` (also via symlinks)."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise GraftkdError(f"bad image path {rel!r}: paths must be non-empty relative paths using '/'")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise GraftkdError(f"image path {rel!r} is absolute or leaves the source folder {root}; use a path relative to it")
    full = (root / rel).resolve()
    if not full.is_relative_to(root.resolve()):
        raise GraftkdError(f"image path {rel!r} resolves outside the source folder {root} (symlink?); refusing to read it")
    return full


def load_image_files(
    root: str | os.PathLike,
    relpaths: list[str],
    *,
    grayscale: bool = False,
    on_bad_image: str = "error",
    workers: int = 0,
    cache: bool = False,
) -> ImageSet:
    """Read the listed images (paths relative to ``root``) in the given order, unlabeled.

    Used to materialise manifests of unlabeled folders. Paths must stay inside ``root``.
    """
    check_policy(on_bad_image)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise GraftkdError(f"image folder not found: {root}; check the path")
    rels = list(relpaths)
    for rel in rels:
        full = _check_relpath(rel, root)
        if not full.is_file():
            raise GraftkdError(f"image {rel} not found in {root}; the folder changed since the list was made")
    keys = [(i, rel) for i, rel in enumerate(rels)]

    def build() -> dict:
        collector = ImageCollector(str(root), grayscale, on_bad_image)
        decode_stream(collector, _read_files(root, rels, keys), workers)
        return {**_finish(collector, labeled=False), "classes": []}

    # the key hashes the list in order (sorted fingerprint + order digest)
    order = hashlib.sha256("\n".join(rels).encode("utf-8", "surrogateescape")).hexdigest()
    key_parts = ["files", folder_fingerprint(root, rels), order, f"gray={grayscale}", f"bad={on_bad_image}"]
    payload, _ = cached_payload(f"unlabeled-{root.name}", key_parts, build, cache)
    return ImageSet(
        payload["images"], None, [], str(root), paths=payload["paths"], skipped=payload["skipped"]
    )
