"""CIFAR-10/100 in the python (pickle) format: reading with a numpy-only unpickler, and the download."""
from __future__ import annotations

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

import numpy as np
import torch

from graftkd.data.dataset import ImageSet
from graftkd.data.readers.common import _check_split
from graftkd.errors import GraftkdError
from graftkd.files import atomic_write_bytes


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
