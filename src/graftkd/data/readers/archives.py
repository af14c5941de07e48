"""Tar archives holding ``<split>/<class>/<image>``, read in one streaming pass without extracting."""
from __future__ import annotations

import os
import tarfile
import zlib
from pathlib import Path
from typing import Iterator

import torch

from graftkd.data.cache import cached_payload, file_sha256
from graftkd.data.dataset import ImageSet
from graftkd.data.images import ImageCollector, check_policy, decode_stream, is_image_name, looked_for
from graftkd.data.readers.common import _family, _finish
from graftkd.errors import GraftkdError


_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2")


def is_archive_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(_ARCHIVE_SUFFIXES)


def _member_parts(name: str) -> tuple[str, ...] | None:
    """Normalised path parts of an archive member, or None for hidden / unsafe / non-image entries."""
    if name.startswith("/") or not is_image_name(name):
        return None
    parts = tuple(p for p in name.split("/") if p and p != ".")
    if not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return None  # hidden entries, AppleDouble files, and '..' (starts with '.')
    return parts


def _scan_archive(path: Path, split: str | None, collector: ImageCollector, workers: int) -> tuple[list[str], set[str]]:
    """Stream the archive once; decode members under ``split/<class>/``. Returns (classes, top-level names)."""
    class_names: set[str] = set()
    tops: set[str] = set()
    depth = 3 if split else 2

    def items() -> Iterator[tuple[tuple, str, bytes]]:
        with tarfile.open(path, "r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                parts = _member_parts(member.name)
                if parts is None:
                    continue
                tops.add(parts[0])
                if len(parts) < depth or (split and parts[0] != split):
                    continue
                cls = parts[depth - 2]
                rel = "/".join(parts[depth - 2 :])
                f = tf.extractfile(member)
                if f is None:
                    continue
                class_names.add(cls)
                yield (cls, rel), rel, f.read()

    try:
        decode_stream(collector, items(), workers)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise GraftkdError(
            f"cannot read archive {path} ({type(exc).__name__}: {exc}); it is damaged or not a tar archive: "
            "re-download or re-create it"
        ) from exc
    return sorted(class_names), tops


def load_image_archive(
    path: str | os.PathLike,
    split: str | None = None,
    *,
    grayscale: bool = False,
    on_bad_image: str = "error",
    workers: int = 0,
    cache: bool = False,
) -> ImageSet:
    """Read a ``.tar`` / ``.tar.gz`` holding ``<split>/<class>/<image>`` (or ``<class>/<image>`` when
    ``split`` is None) in one streaming pass, without extracting to disk.

    Same conventions as ``load_image_folder``: class index = alphabetical order of class folder names,
    images sorted by path within a class, RGB (or "L" with ``grayscale``), equal sizes required.
    With ``cache`` the decoded set is stored under the graftkd cache, keyed by the archive's sha256.
    """
    check_policy(on_bad_image)
    path = Path(path).expanduser()
    if not path.is_file():
        raise GraftkdError(f"archive not found: {path}; check the path")
    where = f"{path}:{split}/" if split else str(path)

    def build() -> dict:
        collector = ImageCollector(where, grayscale, on_bad_image)
        classes, tops = _scan_archive(path, split, collector, workers)
        if not classes:
            layout = f"{split}/<class>/<image>" if split else "<class>/<image>"
            raise GraftkdError(
                f"no images under {layout} in archive {path} (top-level entries: "
                f"{', '.join(sorted(tops)[:10]) or 'none'}; looked for {looked_for()}); pick a split that exists"
            )
        payload = _finish(collector, labeled=False)
        # keys are (class name, rel): turn class names into alphabetical indices
        index = {c: i for i, c in enumerate(classes)}
        payload["labels"] = torch.tensor([index[p.split("/", 1)[0]] for p in payload["paths"]], dtype=torch.int64)
        payload["classes"] = classes
        return payload

    key_parts = ["archive", file_sha256(path) if cache else "-", f"split={split}", f"gray={grayscale}", f"bad={on_bad_image}"]
    payload, _ = cached_payload(f"{path.name}-{split or 'all'}", key_parts, build, cache)
    classes = list(payload["classes"])
    return ImageSet(
        payload["images"],
        payload["labels"],
        classes,
        f"{path}/{split}" if split else str(path),
        paths=payload["paths"],
        skipped=payload["skipped"],
        dataset=_family(path, len(classes)),
    )
