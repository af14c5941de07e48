"""``load_dataset``: the one entry point that turns a dataset spec into an ``ImageSet``.

A spec is one of:

* ``"digits"``: the scikit-learn 8x8 digits (embedded, always available);
* ``"cifar10"`` / ``"cifar100"``: looked up under a data root (``data_root`` argument, else
  ``$GRAFTKD_DATA``, else ``./data``, else ``<cache>/datasets``): first ``<name>.tar.gz`` / ``.tgz`` /
  ``.tar`` (``<split>/<class>/NNNN.webp`` layout), then the official python format
  (``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``);
* a path to a ``.tar`` / ``.tar.gz`` archive with ``<split>/<class>/<image>`` inside;
* a path to an image pack (``.pt``, ``graftkd.data.pack``): named splits as uint8 tensors;
* a path to an image-folder root with ``<split>/<class>/<image>`` (or ``<class>/<image>`` when
  ``split`` is None); a CIFAR python-format folder or official archive is recognised too.
"""
from __future__ import annotations

import os
from pathlib import Path

from graftkd.data.cache import cache_dir, file_sha256
from graftkd.data.dataset import ImageSet
from graftkd.data.pack import is_pack_path, load_pack
from graftkd.data.readers import (
    CIFAR_INFO,
    is_archive_path,
    load_cifar_python,
    load_digits,
    load_image_archive,
    load_image_folder,
)
from graftkd.errors import GraftkdError

__all__ = ["KNOWN_DATASETS", "load_dataset", "resolve_source", "data_roots", "source_sha256"]

KNOWN_DATASETS = ("digits", "cifar10", "cifar100")


def data_roots(data_root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for named datasets, in order."""
    if data_root is not None:
        return [Path(data_root).expanduser()]
    roots: list[Path] = []
    env = os.environ.get("GRAFTKD_DATA")
    if env:
        roots.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
    roots.append(Path("data"))
    roots.append(cache_dir() / "datasets")
    return roots


def _named_candidates(name: str, root: Path) -> list[tuple[str, Path]]:
    info = CIFAR_INFO[name]
    return [
        ("archive", root / f"{name}.tar.gz"),
        ("archive", root / f"{name}.tgz"),
        ("archive", root / f"{name}.tar"),
        ("python", root / info["dir"]),
        ("python", root / info["archive"]),
    ]


def resolve_source(spec: str, data_root: str | os.PathLike | None = None) -> tuple[str, Path | None]:
    """Classify a spec: ``("digits", None)``, ``("archive"|"python"|"folder", path)``.

    Named CIFAR specs are resolved to the first matching file or folder under ``data_roots``.
    """
    spec = str(spec)
    if spec == "digits":
        return "digits", None
    if spec in CIFAR_INFO and not Path(spec).exists():
        roots = data_roots(data_root)
        for root in roots:
            for kind, cand in _named_candidates(spec, root):
                if (kind == "archive" and cand.is_file()) or (kind == "python" and cand.exists()):
                    return kind, cand
        looked = "; ".join(str(r) for r in roots)
        info = CIFAR_INFO[spec]
        raise GraftkdError(
            f"dataset {spec!r} not found (looked in: {looked} for {spec}.tar.gz, {info['dir']}/ or "
            f"{info['archive']}); set GRAFTKD_DATA to the folder holding it, or download it with "
            f"graftkd.data.download_cifar(<folder>, {spec!r})"
        )
    path = Path(spec).expanduser()
    if not path.exists():
        raise GraftkdError(
            f"dataset {spec!r} not found: it is not one of {', '.join(KNOWN_DATASETS)} and there is no "
            "file or folder at that path; check the spelling"
        )
    if path.is_file():
        if any(path.name == info["archive"] for info in CIFAR_INFO.values()):
            return "python", path
        if is_archive_path(path):
            return "archive", path
        if is_pack_path(path):
            return "pack", path
        raise GraftkdError(f"{path} is a file but not a .tar/.tar.gz archive or a .pt image pack; give an archive, "
                           "a pack or an image folder")
    for info in CIFAR_INFO.values():
        if (path / info["meta"]).is_file() or (path / info["dir"] / info["meta"]).is_file():
            return "python", path
    return "folder", path


def _python_name(path: Path) -> str:
    """Which CIFAR a python-format folder or official archive holds."""
    for name, info in CIFAR_INFO.items():
        if path.name in (info["dir"], info["archive"]) or (path / info["dir"]).is_dir():
            return name
    for name, info in CIFAR_INFO.items():
        if (path / info["meta"]).is_file():  # batches.meta -> cifar10, meta -> cifar100
            return name
    raise GraftkdError(f"cannot tell whether {path} holds CIFAR-10 or CIFAR-100; give 'cifar10' or 'cifar100' by name")


def source_sha256(spec: str, data_root: str | os.PathLike | None = None) -> str | None:
    """sha256 of the file a spec resolves to (archives), or None for folders and ``digits``."""
    kind, path = resolve_source(spec, data_root)
    if path is not None and path.is_file():
        return file_sha256(path)
    return None


def load_dataset(
    spec: str,
    split: str | None,
    cache: bool = True,
    *,
    data_root: str | os.PathLike | None = None,
    grayscale: bool = False,
    on_bad_image: str = "error",
    workers: int = 0,
) -> ImageSet:
    """Load a dataset split from a spec (see the module docstring); the one entry point for data.

    Archives and image folders are decoded once and cached (``cache=True``) under ``$GRAFTKD_CACHE``
    or ``~/.cache/graftkd``. ``workers > 0`` decodes with that many processes on a cache miss.
    """
    kind, path = resolve_source(spec, data_root)
    if kind == "digits":
        if split is None:
            raise GraftkdError("digits needs a split: 'train' or 'test'")
        return load_digits(split)
    assert path is not None
    if kind == "pack":
        return load_pack(path, split)
    if kind == "python":
        name = spec if spec in CIFAR_INFO else _python_name(path)
        if split is None:
            raise GraftkdError(f"{spec} needs a split: 'train' or 'test'")
        return load_cifar_python(path, name, split)
    if kind == "archive":
        if spec in CIFAR_INFO and split not in ("train", "test"):
            raise GraftkdError(f"unknown split {split!r} for {spec}; use 'train' or 'test'")
        ds = load_image_archive(
            path, split, grayscale=grayscale, on_bad_image=on_bad_image, workers=workers, cache=cache
        )
        if spec in CIFAR_INFO:
            expected = CIFAR_INFO[spec]["num_classes"]
            if ds.num_classes != expected:
                raise GraftkdError(
                    f"{path} holds {ds.num_classes} classes under {split}/ but {spec} has {expected}; "
                    f"it is not a {spec} archive: rename or replace it"
                )
            ds.name = f"{spec}/{split}"
            ds.dataset = spec
        return ds
    return load_image_folder(
        path, split, grayscale=grayscale, on_bad_image=on_bad_image, workers=workers, cache=cache
    )
