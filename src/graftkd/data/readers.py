"""Readers: CIFAR python format, labeled image folders, tar archives, unlabeled folders, sklearn digits.

Every reader returns an ``ImageSet`` of uint8 ``(N, C, H, W)`` images. Labeled readers order images by
class index (alphabetical order of class folder names) and then by relative path, so an index means
the same image on every machine holding the same files.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
import warnings
import zlib
from importlib import import_module
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import torch

from graftkd.data.cache import cached_payload, file_sha256, folder_fingerprint
from graftkd.data.dataset import ImageSet
from graftkd.data.images import ImageCollector, check_policy, decode_stream, is_image_name, looked_for
from graftkd.files import atomic_write_bytes
from graftkd.errors import GraftkdError

__all__ = [
    "CIFAR_INFO",
    "load_cifar_python",
    "download_cifar",
    "load_image_folder",
    "load_image_archive",
    "load_unlabeled_folder",
    "load_image_files",
    "load_digits",
    "is_archive_path",
    "list_images",
]

# ----------------------------------------------------------------------------------------- CIFAR
CIFAR_INFO: dict[str, dict] = {
    "cifar10": {
        "dir": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "names_key": "label_names",
        "labels_key": "labels",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "archive": "cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "num_classes": 10,
    },
    "cifar100": {
        "dir": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "names_key": "fine_label_names",
        "labels_key": "fine_labels",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "archive": "cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "num_classes": 100,
    },
}


def _numpy_attr(name: str):
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray", "numpy._core.numeric", "numpy.core.numeric"):
        try:
            module = import_module(mod)
        except ImportError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise pickle.UnpicklingError(f"numpy has no {name}")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the official CIFAR files: plain containers and numpy arrays, nothing else."""

    _RECONSTRUCT = {"_reconstruct", "scalar", "_frombuffer"}
    _MODULES = {"numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric"}

    def find_class(self, module: str, name: str):
        if module in self._MODULES and name in self._RECONSTRUCT:
            return _numpy_attr(name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "_codecs" and name == "encode":  # python-3 pickles store raw bytes this way
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR data file")


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as exc:
        raise GraftkdError(
            f"cannot read CIFAR file {where} ({type(exc).__name__}: {exc}); it is not the official python "
            "format; re-download it with graftkd.data.download_cifar"
        ) from exc
    if not isinstance(obj, dict):
        raise GraftkdError(f"CIFAR file {where} holds a {type(obj).__name__}, not a dict; re-download it")
    return obj


def _check_name(name: str) -> dict:
    if name not in CIFAR_INFO:
        raise GraftkdError(f"unknown CIFAR dataset {name!r}; use 'cifar10' or 'cifar100'")
    return CIFAR_INFO[name]


def _check_split(split: str, allowed=("train", "test")) -> None:
    if split not in allowed:
        raise GraftkdError(f"unknown split {split!r}; use one of {', '.join(allowed)}")


def _cifar_reader(root: Path, info: dict):
    """Return ``(read(member) -> bytes, description)`` for a python-format dir, its parent, or the tar.gz."""
    candidates = [root, root / info["dir"]]
    for cand in candidates:
        if cand.is_dir() and (cand / info["meta"]).is_file():
            return (lambda m, d=cand: (d / m).read_bytes()), str(cand)
    tar_candidates = [root] if root.is_file() else [root / info["archive"]]
    for cand in tar_candidates:
        if cand.is_file():
            members: dict[str, bytes] = {}
            try:
                with tarfile.open(cand, "r:*") as tf:
                    for m in tf:
                        base = PurePosixPath(m.name)
                        if m.isfile() and len(base.parts) >= 2 and base.parts[-2] == info["dir"]:
                            f = tf.extractfile(m)
                            if f is not None:
                                members[base.name] = f.read()
            except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                raise GraftkdError(f"cannot read archive {cand} ({exc}); re-download it") from exc

            def read(m: str, members=members, cand=cand) -> bytes:
                if m not in members:
                    raise GraftkdError(f"{cand} has no {info['dir']}/{m}; it is not the official archive, re-download it")
                return members[m]

            return read, str(cand)
    raise GraftkdError(
        f"no CIFAR python-format data in {root} (looked for {info['dir']}/{info['meta']} and {info['archive']}); "
        f"download it with graftkd.data.download_cifar({str(root)!r}, ...)"
    )


def load_cifar_python(root: str | os.PathLike, name: str, split: str, class_major: bool = True) -> ImageSet:
    """Read CIFAR-10/100 in the official python format.

    ``root`` may be the ``cifar-10-batches-py`` / ``cifar-100-python`` folder, its parent, the official
    ``cifar-*-python.tar.gz`` archive, or the folder holding that archive (read in memory, not
    extracted). CIFAR-100 uses the fine labels. With ``class_major`` (default) images are stably
    sorted by label, which is the canonical graftkd order: it equals the order of the
    ``<split>/<class>/NNNN.webp`` archives, so few-shot indices agree between both formats.
    """
    info = _check_name(name)
    _check_split(split)
    read, where = _cifar_reader(Path(root).expanduser(), info)
    meta = _unpickle(read(info["meta"]), f"{where}/{info['meta']}")
    classes = [str(c) for c in meta.get(info["names_key"], [])]
    if len(classes) != info["num_classes"]:
        raise GraftkdError(f"{where}/{info['meta']} lists {len(classes)} class names, expected {info['num_classes']}")
    datas, labels = [], []
    for member in info[split]:
        batch = _unpickle(read(member), f"{where}/{member}")
        try:
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            lab = np.asarray(batch[info["labels_key"]], dtype=np.int64).reshape(-1)
        except (KeyError, ValueError) as exc:
            raise GraftkdError(f"{where}/{member} is not in the official CIFAR layout ({exc}); re-download it") from exc
        if lab.shape[0] != data.shape[0]:
            raise GraftkdError(f"{where}/{member}: {data.shape[0]} images but {lab.shape[0]} labels; re-download it")
        datas.append(data)
        labels.append(lab)
    images = torch.from_numpy(np.concatenate(datas))
    targets = torch.from_numpy(np.concatenate(labels))
    if class_major:
        order = torch.sort(targets, stable=True).indices
        images, targets = images[order], targets[order]
    return ImageSet(images.contiguous(), targets, classes, f"{name}/{split}", dataset=name)


def download_cifar(root: str | os.PathLike, name: str, force: bool = False, timeout: float = 60.0) -> Path:
    """Download the official CIFAR python archive into ``root`` and verify its md5; returns its path.

    Only runs when called explicitly. The archive is kept as is (``load_cifar_python`` reads it without
    extracting). An existing file with the right checksum is reused unless ``force``.
    """
    info = _check_name(name)
    target = Path(root).expanduser() / info["archive"]
    if target.is_file() and not force:
        if _md5(target.read_bytes()) == info["md5"]:
            return target
        warnings.warn(f"{target} has the wrong checksum; downloading it again", stacklevel=2)
    buf = io.BytesIO()
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(info["url"], timeout=timeout) as resp:  # noqa: S310 (fixed https URL)
            while True:
                block = resp.read(1 << 20)
                if not block:
                    break
                buf.write(block)
                digest.update(block)
    except OSError as exc:
        raise GraftkdError(
            f"could not download {info['url']} ({exc}); check your network, or download it by hand into {target.parent}"
        ) from exc
    if digest.hexdigest() != info["md5"]:
        raise GraftkdError(
            f"downloaded {info['url']} has md5 {digest.hexdigest()}, expected {info['md5']}; "
            "the download is corrupt: try again"
        )
    atomic_write_bytes(target, buf.getvalue())
    return target


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# ----------------------------------------------------------------------------------------- folders
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


# ----------------------------------------------------------------------------------------- archives
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


# ----------------------------------------------------------------------------------------- digits
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
