"""Few-shot subsets: seeded K-per-class sampling, disjoint subsets, and a JSON manifest.

Labels are used only to stratify the sample (K images of each class); a materialised manifest has
its labels dropped, because grafting learns from the teacher alone. ``materialize_with_labels``
exists for diagnostics and reports only.

A manifest records what was chosen so that a run can be repeated or moved to another machine:
indices into a labeled source (in graftkd's canonical order, see ``graftkd.data.readers``), or
relative paths into an unlabeled folder.
"""
from __future__ import annotations

import json
import operator
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import torch

from graftkd import __version__
from graftkd.data.dataset import ImageSet
from graftkd.data.cache import file_sha256
from graftkd.data.readers import CIFAR_INFO, list_images, load_image_files, load_unlabeled_folder
from graftkd.data.sources import load_dataset, resolve_source, source_sha256
from graftkd.files import atomic_write_json
from graftkd.errors import GraftkdError

__all__ = [
    "sample_few_shot",
    "sample_unlabeled",
    "FewShotManifest",
    "make_manifest",
    "make_unlabeled_manifest",
    "MANIFEST_FORMAT",
]

MANIFEST_FORMAT = "graftkd-fewshot/1"


def _check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int (Python or numpy integer, not bool) that is at least ``minimum``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise GraftkdError(f"{name} must be an integer (got {value!r})") from None
    if value < minimum:
        raise GraftkdError(f"{name} must be at least {minimum} (got {value})")
    return value


def sample_few_shot(
    labels: torch.Tensor | Sequence[int],
    k: int,
    seed: int,
    subset: int = 0,
    classes: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> list[int]:
    """K indices per class, seeded; ``subset`` picks one of several disjoint samples.

    For each class (in label order) the class's indices (ascending) are permuted once with a
    generator seeded by ``seed``; subset ``s`` takes positions ``s*K .. (s+1)*K - 1`` of that
    permutation, so subsets 0, 1, 2, ... never overlap. Returns the chosen indices sorted ascending.
    ``classes`` (names) only improve error messages; ``num_classes`` (default ``len(classes)`` or
    ``max(label) + 1``) makes a class with no images at all an error too.
    """
    try:
        k = _check_int("K", k, 1)
    except GraftkdError:
        raise GraftkdError(f"K must be at least 1 image per class (got K={k!r}); pass a positive K such as 5") from None
    subset = _check_int("subset", subset, 0)
    seed = _check_int("seed", seed, 0)
    labels_t = torch.as_tensor(labels).detach().to("cpu")
    if labels_t.dim() != 1 or labels_t.is_floating_point():
        raise GraftkdError(f"labels must be a 1-D integer tensor (got {labels_t.dtype} {tuple(labels_t.shape)})")
    labels_t = labels_t.to(torch.int64)
    if labels_t.numel() == 0:
        raise GraftkdError("cannot sample a few-shot set from an empty dataset; check the data source")
    if int(labels_t.min()) < 0:
        raise GraftkdError(f"labels must be >= 0 (got {int(labels_t.min())})")
    if num_classes is None:
        num_classes = len(classes) if classes else int(labels_t.max()) + 1
    counts = torch.bincount(labels_t, minlength=num_classes).tolist()
    need = k * (subset + 1)
    short = [c for c in range(num_classes) if counts[c] < need]
    if short:
        c = min(short, key=lambda i: (counts[i], i))
        cname = f"{classes[c]!r}" if classes and c < len(classes) else f"#{c}"
        max_k = min(counts) // (subset + 1)
        which = f" for subset {subset} (subsets 0..{subset} each take K per class)" if subset else ""
        fix = f"use K <= {max_k}" if max_k >= 1 else "use a lower subset index or a larger dataset"
        raise GraftkdError(
            f"K={k}{which} needs {need} images of class {cname} (index {c}) but it has only {counts[c]}; "
            f"the largest K that works is {max_k}: {fix}"
        )
    g = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    order = torch.argsort(labels_t, stable=True)
    start = 0
    for c in range(num_classes):
        idx = order[start : start + counts[c]]  # this class's indices, ascending
        start += counts[c]
        perm = torch.randperm(idx.numel(), generator=g)
        chosen.extend(idx[perm[subset * k : (subset + 1) * k]].tolist())
    return sorted(chosen)


def sample_unlabeled(n_total: int, n: int, seed: int, subset: int = 0) -> list[int]:
    """``n`` of ``n_total`` indices, seeded; subsets are disjoint blocks of one permutation (sorted)."""
    n = _check_int("the number of images", n, 1)
    subset = _check_int("subset", subset, 0)
    seed = _check_int("seed", seed, 0)
    if n * (subset + 1) > n_total:
        raise GraftkdError(
            f"{n} images{f' for subset {subset}' if subset else ''} needs {n * (subset + 1)} images but the folder has "
            f"{n_total}; the largest count that works is {n_total // (subset + 1)}"
        )
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_total, generator=g)
    return sorted(perm[subset * n : (subset + 1) * n].tolist())


# --------------------------------------------------------------------------------------- manifest
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def _check_relative(rel: Any, i: int) -> str:
    if not isinstance(rel, str) or not rel:
        raise GraftkdError(f"manifest field 'paths'[{i}] must be a non-empty string (got {rel!r})")
    p = PurePosixPath(rel)
    if (
        "\\" in rel
        or "\x00" in rel
        or p.is_absolute()
        or ".." in p.parts
        or (p.parts and ":" in p.parts[0])
    ):
        raise GraftkdError(
            f"manifest field 'paths'[{i}] = {rel!r} is absolute or escapes the source folder; "
            "paths must be relative to the source folder, use '/', and contain no '..'"
        )
    return rel


@dataclass
class FewShotManifest:
    """What a few-shot subset is: the source, the split, and either indices or relative paths.

    ``indices`` select from a labeled source (``load_dataset(source, split)``); ``paths`` select
    files, relative to ``source``, from an unlabeled folder (``split`` is then ``""``). ``k`` is images
    per class (labeled) or the image count (unlabeled, where ``num_classes`` is 0).
    ``source_sha256`` is the sha256 of the source file when it is an archive, checked on materialise.
    """

    source: str
    split: str
    indices: list[int] | None
    paths: list[str] | None
    seed: int
    k: int
    subset: int
    num_classes: int
    source_sha256: str | None = None
    source_size: int | None = None
    created_by: str = field(default_factory=lambda: f"graftkd {__version__}")
    format: str = MANIFEST_FORMAT

    # manifests loaded from a file remember where, to resolve relative source paths
    _base_dir: Path | None = field(default=None, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ validation
    def validate(self) -> "FewShotManifest":
        """Check every field's type and value; raises ``GraftkdError`` naming the bad field."""
        if not isinstance(self.format, str) or not self.format.startswith("graftkd-fewshot/"):
            raise GraftkdError(f"manifest field 'format' must be {MANIFEST_FORMAT!r} (got {self.format!r})")
        if self.format != MANIFEST_FORMAT:
            raise GraftkdError(
                f"manifest format {self.format!r} is not supported by graftkd {__version__} "
                f"(expected {MANIFEST_FORMAT!r}); upgrade graftkd"
            )
        for name in ("source", "split", "created_by"):
            if not isinstance(getattr(self, name), str):
                raise GraftkdError(f"manifest field {name!r} must be a string (got {getattr(self, name)!r})")
        if not self.source:
            raise GraftkdError("manifest field 'source' must not be empty")
        for name, minimum in (("seed", 0), ("k", 1), ("subset", 0), ("num_classes", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise GraftkdError(f"manifest field {name!r} must be an integer (got {value!r})")
            if value < minimum:
                raise GraftkdError(f"manifest field {name!r} must be at least {minimum} (got {value})")
        if self.source_sha256 is not None and (
            not isinstance(self.source_sha256, str) or not _SHA_RE.match(self.source_sha256)
        ):
            raise GraftkdError(
                f"manifest field 'source_sha256' must be 64 lowercase hex digits or null (got {self.source_sha256!r})"
            )
        if self.source_size is not None and (
            isinstance(self.source_size, bool) or not isinstance(self.source_size, int) or self.source_size < 1
        ):
            raise GraftkdError(f"manifest field 'source_size' must be a positive integer or null (got {self.source_size!r})")
        if (self.indices is None) == (self.paths is None):
            raise GraftkdError("manifest must have exactly one of 'indices' (labeled source) or 'paths' (unlabeled folder)")
        if self.indices is not None:
            if not isinstance(self.indices, list) or not self.indices:
                raise GraftkdError(f"manifest field 'indices' must be a non-empty list of integers (got {type(self.indices).__name__})")
            for i, v in enumerate(self.indices):
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise GraftkdError(f"manifest field 'indices'[{i}] must be a non-negative integer (got {v!r})")
            if self.source_size is not None and max(self.indices) >= self.source_size:
                raise GraftkdError(
                    f"manifest field 'indices' has {max(self.indices)} but the source has {self.source_size} images"
                )
            if len(set(self.indices)) != len(self.indices):
                raise GraftkdError("manifest field 'indices' lists an index twice; every image may appear once")
        if self.paths is not None:
            if not isinstance(self.paths, list) or not self.paths:
                raise GraftkdError(f"manifest field 'paths' must be a non-empty list of strings (got {type(self.paths).__name__})")
            for i, rel in enumerate(self.paths):
                _check_relative(rel, i)
            if len(set(self.paths)) != len(self.paths):
                raise GraftkdError("manifest field 'paths' lists a file twice; every image may appear once")
        return self

    @property
    def is_unlabeled(self) -> bool:
        return self.paths is not None

    def __len__(self) -> int:
        return len(self.indices if self.indices is not None else self.paths or [])

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("_base_dir", None)
        # stable key order: format first, the long lists last
        order = ["format", "created_by", "source", "source_sha256", "source_size", "split", "seed", "k",
                 "subset", "num_classes", "indices", "paths"]
        return {key: d[key] for key in order}

    def save(self, path: str | os.PathLike) -> Path:
        """Validate and write the manifest as JSON, atomically."""
        self.validate()
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> "FewShotManifest":
        if not isinstance(data, dict):
            raise GraftkdError(f"{where}: a manifest must be a JSON object (got {type(data).__name__})")
        known = {f.name for f in fields(cls) if not f.name.startswith("_")}
        required = ["source", "split", "indices", "paths", "seed", "k", "subset", "num_classes"]
        for name in required:
            if name not in data:
                raise GraftkdError(f"{where}: manifest field {name!r} is missing; re-create the manifest")
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"{where}: ignoring unknown manifest field(s) {', '.join(unknown)}", stacklevel=3)
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs.setdefault("format", MANIFEST_FORMAT)
        kwargs.setdefault("created_by", "unknown")
        try:
            manifest = cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - all fields are checked above
            raise GraftkdError(f"{where}: malformed manifest ({exc})") from exc
        try:
            return manifest.validate()
        except GraftkdError as exc:
            raise GraftkdError(f"{where}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FewShotManifest":
        """Read and validate a manifest; errors name the file and the bad field."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise GraftkdError(f"manifest not found: {path}; check the path") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise GraftkdError(f"cannot read manifest {path} ({exc}); check the file") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GraftkdError(f"manifest {path} is not valid JSON (line {exc.lineno}: {exc.msg}); re-create it") from None
        manifest = cls.from_dict(data, where=str(path))
        manifest._base_dir = path.resolve().parent
        return manifest

    # ------------------------------------------------------------------ materialise
    def _resolve(self, data_root: str | os.PathLike | None) -> str:
        """The source spec to load: names stay names; a missing relative path is tried beside the
        manifest file, then in ``data_root`` by file name."""
        src = self.source
        if src == "digits" or Path(src).expanduser().exists():
            return src
        if src in CIFAR_INFO:
            return src
        candidates = []
        if self._base_dir is not None and not Path(src).is_absolute():
            candidates.append(self._base_dir / src)
        if data_root is not None:
            candidates.append(Path(data_root).expanduser() / Path(src).name)
        for cand in candidates:
            if cand.exists():
                return str(cand)
        raise GraftkdError(
            f"manifest source {src!r} not found (also tried: {', '.join(map(str, candidates)) or 'nothing'}); "
            "pass data_root=<folder holding it> or fix 'source' in the manifest"
        )

    def _check_sha(self, spec: str, data_root) -> None:
        if self.source_sha256 is None:
            return
        actual = source_sha256(spec, data_root)
        if actual is None or actual == self.source_sha256:
            return
        msg = (
            f"manifest source {self.source!r} resolved to a file with sha256 {actual[:12]}..., but the manifest was "
            f"made from {self.source_sha256[:12]}...; the indices may select different images"
        )
        if self.source in ("cifar10", "cifar100"):
            # different copies of a named dataset share graftkd's canonical order; warn only
            warnings.warn(msg + " (named dataset: continuing, the order is canonical)", stacklevel=3)
            return
        raise GraftkdError(msg + "; use the original file or re-create the manifest")

    def _load_labeled(self, data_root, cache: bool) -> ImageSet:
        spec = self._resolve(data_root)
        self._check_sha(spec, data_root)
        full = load_dataset(spec, self.split or None, cache=cache, data_root=data_root)
        if self.source_size is not None and len(full) != self.source_size:
            raise GraftkdError(
                f"manifest source {self.source!r} split {self.split!r} has {len(full)} images but the manifest was made "
                f"from {self.source_size}; use the original data or re-create the manifest"
            )
        if full.num_classes != self.num_classes:
            raise GraftkdError(
                f"manifest source {self.source!r} has {full.num_classes} classes but the manifest says "
                f"{self.num_classes}; use the original data or re-create the manifest"
            )
        assert self.indices is not None
        return full.subset(self.indices, name=self._subset_name(full.name))

    def _subset_name(self, base: str) -> str:
        unit = "per class" if not self.is_unlabeled else "images"
        return f"{base}[fewshot k={self.k} {unit} seed={self.seed} subset={self.subset}]"

    def materialize(self, data_root: str | os.PathLike | None = None, cache: bool = True) -> ImageSet:
        """Load the source and return the selected images with labels DROPPED (``labels=None``)."""
        if self.is_unlabeled:
            spec = self._resolve(data_root)
            ds = load_image_files(spec, self.paths or [])
            ds.name = self._subset_name(ds.name)
            return ds
        return self._load_labeled(data_root, cache).drop_labels()

    def materialize_with_labels(self, data_root: str | os.PathLike | None = None, cache: bool = True) -> ImageSet:
        """Diagnostics only: the selected images WITH their hidden labels. Grafting never uses these."""
        if self.is_unlabeled:
            raise GraftkdError(f"manifest source {self.source!r} is an unlabeled folder: there are no labels to show")
        return self._load_labeled(data_root, cache)


def make_manifest(
    source: str,
    split: str,
    k: int,
    seed: int = 0,
    subset: int = 0,
    *,
    data_root: str | os.PathLike | None = None,
    cache: bool = True,
) -> FewShotManifest:
    """Sample K images per class from a labeled source (any ``load_dataset`` spec) into a manifest."""
    full = load_dataset(source, split, cache=cache, data_root=data_root)
    if full.labels is None:
        raise GraftkdError(f"{source} has no labels; use make_unlabeled_manifest for unlabeled folders")
    indices = sample_few_shot(full.labels, k, seed, subset, classes=full.classes, num_classes=full.num_classes)
    _, path = resolve_source(source, data_root)
    sha = file_sha256(path) if path is not None and path.is_file() else None
    return FewShotManifest(
        source=str(source),
        split=split or "",
        indices=indices,
        paths=None,
        seed=int(seed),
        k=int(k),
        subset=int(subset),
        num_classes=full.num_classes,
        source_sha256=sha,
        source_size=len(full),
    ).validate()


def make_unlabeled_manifest(
    folder: str | os.PathLike, n: int | None = None, seed: int = 0, subset: int = 0
) -> FewShotManifest:
    """Pick ``n`` images (all when None) from an unlabeled folder, recording relative paths.

    Images are read once to check that every chosen file decodes and that sizes agree.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise GraftkdError(f"image folder not found: {root}; check the path")
    rels = list_images(root)
    if not rels:
        load_unlabeled_folder(root)  # raises the standard "no images found" error
    if n is None:
        if subset:
            raise GraftkdError("subset needs a count n: give n to split the folder into disjoint subsets")
        chosen = rels
    else:
        chosen = [rels[i] for i in sample_unlabeled(len(rels), n, seed, subset)]
    load_image_files(root, chosen)  # fail now, not on the GPU machine
    return FewShotManifest(
        source=str(folder),
        split="",
        indices=None,
        paths=chosen,
        seed=int(seed),
        k=len(chosen),
        subset=int(subset),
        num_classes=0,
        source_size=len(rels),
    ).validate()


#: The few-shot draws the validation images must never overlap: K <= 10, subsets 0..2, seeds 0..9 (every
#: committed grid cell draws inside these: subset s of K takes positions s*K .. (s+1)*K - 1 of the per-class
#: permutation, within the first 30 for K <= 10 and s <= 2).
VALIDATION_EXCLUDES = {"k": 10, "subsets": 3, "seeds": 10}
VALIDATION_SEED = 20_261_201


def validation_indices(labels: torch.Tensor | Sequence[int], per_class: int = 100) -> list[int]:
    """A fixed labeled validation split of the training images, for development choices (never the test split).

    ``per_class`` images of each class, drawn with their own seed from the training images that no few-shot
    subset in ``VALIDATION_EXCLUDES`` uses. Returns indices sorted ascending.
    """
    labels_t = torch.as_tensor(labels).to(torch.int64)
    used: set[int] = set()
    for seed in range(VALIDATION_EXCLUDES["seeds"]):
        for subset in range(VALIDATION_EXCLUDES["subsets"]):
            used.update(sample_few_shot(labels_t, VALIDATION_EXCLUDES["k"], seed, subset))
    g = torch.Generator().manual_seed(VALIDATION_SEED)
    chosen: list[int] = []
    for c in range(int(labels_t.max()) + 1):
        pool = [i for i in torch.nonzero(labels_t == c).flatten().tolist() if i not in used]
        if len(pool) < per_class:
            raise GraftkdError(f"class {c} has only {len(pool)} images outside the few-shot draws; lower per_class")
        perm = torch.randperm(len(pool), generator=g)[:per_class]
        chosen.extend(pool[i] for i in perm.tolist())
    return sorted(chosen)
