"""Models as graftkd loads and saves them: a registered teacher or a weights file with its normalisation,
and the student.pt format every method writes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from graftkd.engine.evaluate import evaluate_model
from graftkd.files import atomic_torch_save
from graftkd.errors import GraftkdError
from graftkd.models.profile import count_flops, count_params


STUDENT_FORMAT = "graftkd-student/1"


@dataclass
class LoadedModel:
    model: nn.Module
    arch: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    classes: list[str] | None = None
    accuracy: dict | None = None  # a registered teacher's recorded accuracy and the data it was measured on


def normalizer(mean, std) -> nn.Module:
    from graftkd.data.normalize import Normalizer

    return Normalizer(mean, std)


def load_model_file(arch: str, path: str | Path, num_classes: int | None) -> LoadedModel:
    """A teacher or a saved graftkd model: zoo architecture + weights file, strictly loaded."""
    from graftkd.models.teachers import load_pretrained

    model, meta = load_pretrained(arch, path, num_classes=num_classes)
    return LoadedModel(model, arch, tuple(meta["mean"]), tuple(meta["std"]), str(path), meta.get("classes"))


def saved_arch(path: str | Path) -> str | None:
    """The architecture a graftkd ``student.pt`` / ``model.pt`` (or an exported ``model.safetensors``) names,
    or None for any other weights file."""
    if str(path).endswith(".safetensors"):
        from graftkd.models.convert import read_checkpoint

        arch = read_checkpoint(path)[1].get("arch")
        return str(arch) if arch else None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not ours (or unreadable): the caller asks for the architecture
        return None
    if isinstance(payload, dict) and payload.get("format") == STUDENT_FORMAT and payload.get("arch") != "hybrid":
        return str(payload["arch"])
    return None


def load_teacher(
    spec: str, arch: str | None, num_classes: int | None, teachers_dir: str | Path | None = None
) -> LoadedModel:
    """``spec`` is a registered teacher name (verified by sha256) or a weights file (then ``arch`` is needed)."""
    from graftkd.models.teacher_registry import load_registered, load_registry

    registry = load_registry()
    if spec in registry and not Path(spec).is_file():
        model, meta, entry = load_registered(spec, teachers_dir, registry)
        if arch and arch.strip().lower() != entry.arch:
            raise GraftkdError(f"teacher '{entry.name}' is a {entry.arch}, not {arch}: drop --teacher-arch")
        if num_classes is not None and num_classes != entry.num_classes:
            raise GraftkdError(f"teacher '{entry.name}' predicts {entry.num_classes} classes but the data has "
                               f"{num_classes}: use a teacher trained on this data")
        recorded = ({"test_acc": entry.accuracy, "data": entry.accuracy_data, "result": entry.accuracy_result}
                    if entry.accuracy is not None and entry.accuracy_data else None)
        return LoadedModel(model, entry.arch, tuple(entry.mean), tuple(entry.std), f"{entry.name} ({meta['source']})",
                           meta.get("classes"), recorded)
    if not Path(spec).exists():
        names = ", ".join(e.name for e in registry)
        if any(sep in spec for sep in ("/", "\\")) or Path(spec).suffix in (".pt", ".pth", ".th", ".bin"):
            raise GraftkdError(f"weights file {spec} not found (check the path; registered teachers: {names})")
        raise GraftkdError(f"teacher '{spec}' is neither a file nor a registered teacher ({names})")
    arch = arch or saved_arch(spec)
    if not arch:
        raise GraftkdError(f"{spec} is a weights file: say its architecture with --teacher-arch (e.g. resnet56)")
    return load_model_file(arch, spec, num_classes=num_classes)  # None: the class count the file was saved with


def save_model(path: Path, loaded: LoadedModel, extra: dict) -> None:
    """Plain state_dict + what rebuilds the model: the file loads with ``torch.load(weights_only=True)``."""
    atomic_torch_save(
        path,
        {"format": STUDENT_FORMAT, "arch": loaded.arch, "state_dict": loaded.model.state_dict(),
         "mean": list(loaded.mean), "std": list(loaded.std), "classes": loaded.classes, **extra},
    )


def model_costs(model: nn.Module, input_shape: tuple[int, ...]) -> dict:
    return {"params": count_params(model), "flops": count_flops(model, input_shape)}


def teacher_status(entry, teachers_dir: str | Path | None = None) -> str:
    """'ok <path>' when the registered file is present with the right sha256, else what is wrong."""
    from graftkd.models.teacher_registry import find_teacher_file, sha256_of

    try:
        path = find_teacher_file(entry, teachers_dir)
    except GraftkdError:
        return "missing"
    return f"ok {path}" if sha256_of(path) == entry.sha256 else f"sha256 mismatch {path}"


def teacher_accuracy(teacher: LoadedModel, test, norm: nn.Module, device: torch.device,
                      measure: bool, progress: bool = False) -> tuple[float, str]:
    """The registry's recorded accuracy when ``test`` is exactly the data it was measured on (same sha256);
    otherwise, or with ``measure``, the accuracy measured now."""
    recorded = teacher.accuracy
    if not measure and recorded is not None and test.labels is not None:
        if test.content_sha256() == recorded["data"].get("sha256"):
            return float(recorded["test_acc"]), f"registry ({recorded.get('result') or 'teachers.json'})"
    return (evaluate_model(teacher.model.to(device), test.images, test.labels, norm, device, progress=progress,
                           desc="test: teacher"), "measured")


def num_outputs(model: nn.Module, input_shape) -> int:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros((2, *input_shape), device=next(model.parameters()).device))
    model.train(was)
    return int(out.shape[1])
