"""The teacher registry: named, versioned, checksummed teachers that live outside the repository.

Weight files are never part of graftkd. The registry (``teachers.json`` next to this module) says, for
each teacher, which zoo architecture and normalisation it needs, which file holds it, the file's
sha256, the accuracy graftkd measured for it (and the result file that records the measurement) and the
command that reproduces it. Files are looked up in ``--teachers-dir``, then in the folders listed in
``GRAFTKD_TEACHERS`` (``os.pathsep``-separated), then in ``~/.cache/graftkd/teachers``; a file whose
sha256 differs from the registry's is refused before it is unpickled.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from graftkd.errors import GraftkdError

REGISTRY_VERSION = 1
REGISTRY_FILE = "teachers.json"
ENV_DIRS = "GRAFTKD_TEACHERS"
ENV_REGISTRY = "GRAFTKD_REGISTRY"  # extra registry files (your own teachers), merged with the packaged one


@dataclass(frozen=True)
class TeacherEntry:
    """One registered teacher; ``accuracy`` is top-1 (%) measured by ``graftkd evaluate --teacher``."""

    name: str
    arch: str
    dataset: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    file: str
    sha256: str
    accuracy: float | None = None
    accuracy_result: str | None = None
    reference_accuracy: float | None = None
    # the data ``accuracy`` was measured on ({data, split, images, sha256 of ImageSet.content_sha256()}): a run
    # evaluating on exactly these images takes the recorded accuracy instead of measuring it again
    accuracy_data: dict | None = None
    origin: str = ""  # who made the file, and how
    reproduce: str = ""  # the graftkd command that trains this teacher (or a comparable one) from scratch
    source: str = ""  # where a user gets the file
    license: str = ""

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> "TeacherEntry":
        required = ("name", "arch", "dataset", "num_classes", "mean", "std", "file", "sha256")
        missing = [k for k in required if k not in raw]
        if missing:
            raise GraftkdError(f"{where}: teacher entry {raw.get('name', '?')!r} lacks {', '.join(missing)}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise GraftkdError(f"{where}: teacher {raw['name']!r} has unknown keys {', '.join(unknown)}")
        sha = str(raw["sha256"]).lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise GraftkdError(f"{where}: teacher {raw['name']!r} has an invalid sha256 {raw['sha256']!r}")
        values = {**raw, "sha256": sha, "mean": tuple(raw["mean"]), "std": tuple(raw["std"])}
        return cls(**values)


@dataclass(frozen=True)
class TeacherRegistry:
    version: int
    entries: dict[str, TeacherEntry]
    path: str

    def get(self, name: str) -> TeacherEntry:
        key = name.strip().lower()
        if key in self.entries:
            return self.entries[key]
        close = difflib.get_close_matches(key, list(self.entries), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise GraftkdError(f"unknown teacher '{name}': {hint}`graftkd teachers list` shows all "
                           f"{len(self.entries)} registered teachers")

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.strip().lower() in self.entries

    def __iter__(self):
        return iter(self.entries.values())


def load_registry(path: str | os.PathLike | None = None) -> TeacherRegistry:
    """The packaged registry plus the files named in ``GRAFTKD_REGISTRY``; or only the JSON file at ``path``."""
    if path is None:
        merged = _read_registry(None)
        for extra in filter(None, os.environ.get(ENV_REGISTRY, "").split(os.pathsep)):
            more = _read_registry(extra)
            clash = sorted(set(more.entries) & set(merged.entries))
            if clash:
                raise GraftkdError(f"{extra} registers {', '.join(clash)} again: give your teachers other names")
            merged = TeacherRegistry(REGISTRY_VERSION, {**merged.entries, **more.entries}, merged.path)
        return merged
    return _read_registry(path)


def _read_registry(path: str | os.PathLike | None) -> TeacherRegistry:
    if path is None:
        text = resources.files("graftkd.models").joinpath(REGISTRY_FILE).read_text(encoding="utf-8")
        where = f"graftkd/models/{REGISTRY_FILE}"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise GraftkdError(f"cannot read teacher registry {path}: {exc.strerror}") from None
        where = str(path)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GraftkdError(f"{where} is not valid JSON (line {exc.lineno}): {exc.msg}") from None
    if not isinstance(raw, dict) or raw.get("version") != REGISTRY_VERSION or not isinstance(raw.get("teachers"), list):
        raise GraftkdError(f"{where}: expected {{'version': {REGISTRY_VERSION}, 'teachers': [...]}}")
    entries: dict[str, TeacherEntry] = {}
    for item in raw["teachers"]:
        entry = TeacherEntry.from_dict(item, where)
        if entry.name in entries:
            raise GraftkdError(f"{where}: teacher {entry.name!r} is registered twice")
        entries[entry.name] = entry
    return TeacherRegistry(REGISTRY_VERSION, entries, where)


def teacher_dirs(explicit: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for teacher files, in order."""
    dirs: list[Path] = []
    if explicit:
        dirs.append(Path(explicit))
    env = os.environ.get(ENV_DIRS, "")
    dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs.append(Path.home() / ".cache" / "graftkd" / "teachers")
    return dirs


def find_teacher_file(entry: TeacherEntry, explicit_dir: str | os.PathLike | None = None) -> Path:
    """The registered file of ``entry`` in the first folder that holds it."""
    dirs = teacher_dirs(explicit_dir)
    for folder in dirs:
        candidate = folder / entry.file
        if candidate.is_file():
            return candidate
    where = ", ".join(str(d) for d in dirs)
    fetch = f" (source: {entry.source})" if entry.source else ""
    raise GraftkdError(
        f"teacher '{entry.name}' needs {entry.file}, not found in {where}{fetch}; "
        f"put it in one of those folders, pass --teachers-dir, or set {ENV_DIRS}"
    )


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str, name: str) -> None:
    """Refuse a file whose content is not the registered one (checked before any unpickling)."""
    found = sha256_of(path)
    if found != expected.lower():
        raise GraftkdError(
            f"{path}: sha256 {found} does not match the registry's {expected} for teacher '{name}'; "
            "the file is damaged or is not that teacher: fetch it again"
        )


def load_registered(
    name: str, teachers_dir: str | os.PathLike | None = None, registry: TeacherRegistry | None = None
) -> tuple[nn.Module, dict[str, Any], TeacherEntry]:
    """Find, verify and load teacher ``name``: ``(model in eval mode, meta, entry)``.

    ``meta`` is :func:`graftkd.models.teachers.load_pretrained`'s, with the registry's normalisation.
    """
    from graftkd.models.teachers import load_pretrained

    registry = registry or load_registry()
    entry = registry.get(name)
    path = find_teacher_file(entry, teachers_dir)
    verify_sha256(path, entry.sha256, entry.name)
    model, meta = load_pretrained(entry.arch, path, num_classes=entry.num_classes)
    meta.update({"mean": entry.mean, "std": entry.std, "teacher": entry.name, "sha256": entry.sha256})
    return model, meta, entry
