"""One function per CLI command: load inputs, validate them up front, run, write results atomically."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from graftkd.engine.checkpoint import Checkpointer, fingerprint
from graftkd.engine.evaluate import evaluate_model
from graftkd.engine.io import atomic_torch_save, atomic_write_json
from graftkd.engine.runtime import resolve_device, run_facts, seed_everything
from graftkd.engine.supervised import TeacherRecipe, train_supervised
from graftkd.errors import GraftkdError
from graftkd.graft import GraftConfig, graft
from graftkd.models import build_model
from graftkd.models.profile import count_flops, count_params, format_count

STUDENT_FORMAT = "graftkd-student/1"


@dataclass
class LoadedModel:
    model: nn.Module
    arch: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    classes: list[str] | None = None


def normalizer(mean, std) -> nn.Module:
    from graftkd.data.normalize import Normalizer

    return Normalizer(mean, std)


def load_model_file(arch: str, path: str | Path, num_classes: int | None) -> LoadedModel:
    """A teacher or a saved graftkd model: zoo architecture + weights file, strictly loaded."""
    from graftkd.models.teachers import load_pretrained

    model, meta = load_pretrained(arch, path, num_classes=num_classes)
    return LoadedModel(model, arch, tuple(meta["mean"]), tuple(meta["std"]), str(path), meta.get("classes"))


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
        return LoadedModel(model, entry.arch, tuple(entry.mean), tuple(entry.std), f"{entry.name} ({meta['source']})",
                           meta.get("classes"))
    if not Path(spec).exists():
        names = ", ".join(e.name for e in registry)
        if any(sep in spec for sep in ("/", "\\")) or Path(spec).suffix in (".pt", ".pth", ".th", ".bin"):
            raise GraftkdError(f"weights file {spec} not found (check the path; registered teachers: {names})")
        raise GraftkdError(f"teacher '{spec}' is neither a file nor a registered teacher ({names})")
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


# ------------------------------------------------------------------------------------------ evaluate
def teacher_status(entry, teachers_dir: str | Path | None = None) -> str:
    """'ok <path>' when the registered file is present with the right sha256, else what is wrong."""
    from graftkd.models.teacher_registry import find_teacher_file, sha256_of

    try:
        path = find_teacher_file(entry, teachers_dir)
    except GraftkdError:
        return "missing"
    return f"ok {path}" if sha256_of(path) == entry.sha256 else f"sha256 mismatch {path}"


def evaluate_weights(
    *,
    teacher: str | None = None,
    weights: str | Path | None = None,
    arch: str | None = None,
    data: str | None = None,
    split: str = "test",
    teachers_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 500,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Top-1 accuracy of a registered teacher (sha256-verified) or a weights file, as a traceable record."""
    from graftkd.data import load_dataset
    from graftkd.models.teacher_registry import load_registry

    device_ = resolve_device(device)
    facts = run_facts(device_)
    started = time.perf_counter()
    entry = load_registry().get(teacher) if teacher else None
    data = data or (entry.dataset if entry else None)
    if not data:
        raise GraftkdError("--data is needed: the labeled dataset to evaluate on")
    dataset = load_dataset(data, split)
    if dataset.labels is None:
        raise GraftkdError(f"{data} ({split}) has no labels to evaluate against")
    loaded = load_teacher(teacher or str(weights), arch, dataset.num_classes, teachers_dir)
    if loaded.classes and dataset.classes and list(loaded.classes) != list(dataset.classes):
        raise GraftkdError(f"{loaded.source} was trained on classes {loaded.classes[:3]}... but {data} has "
                           f"{dataset.classes[:3]}...: evaluate on the data it was trained on")
    acc = evaluate_model(loaded.model, dataset.images, dataset.labels, normalizer(loaded.mean, loaded.std), device_,
                         batch_size=batch_size, progress=progress)
    payload = {**facts, "kind": "evaluate", "model": teacher or str(weights), "arch": loaded.arch, "source": loaded.source,
               "data": data, "split": split, "images": len(dataset), "accuracy": round(acc, 2),
               "protocol": "top-1 on every image of the split, fp32, no test-time augmentation",
               "wall_seconds": time.perf_counter() - started}
    if entry is not None:
        payload.update({"teacher": entry.name, "sha256": entry.sha256, "registry_accuracy": entry.accuracy,
                        "reference_accuracy": entry.reference_accuracy})
    if out:
        atomic_write_json(Path(out), payload)
    return payload


# ---------------------------------------------------------------------------------------- fewshot
def build_fewshot(
    source: str, k: int, seed: int, subset: int = 0, split: str = "train", out: str | Path | None = None
):
    """Sample K images per class (labels only stratify) and optionally write the manifest."""
    from graftkd.data.fewshot import make_manifest

    manifest = make_manifest(source, split, k, seed, subset)
    if out is not None:
        manifest.save(out)
    return manifest


# ------------------------------------------------------------------------------------- train-teacher
def train_teacher(
    arch: str,
    data: str,
    out: str | Path,
    recipe: TeacherRecipe,
    device: str = "auto",
    progress: bool = True,
    checkpoint_every_s: float = 300.0,
) -> dict:
    """Train zoo model ``arch`` on ``data`` (resumable in ``out``); write model.pt and result.json."""
    from graftkd.data import load_dataset
    from graftkd.data.normalize import channel_stats, stats_for

    device_ = resolve_device(device)
    train = load_dataset(data, "train")
    test = load_dataset(data, "test")
    if train.labels is None:
        raise GraftkdError(f"train-teacher needs labeled data, but {data} has no class folders")
    if train.dataset:
        mean, std = stats_for(train.dataset)
    else:  # a custom folder: measure its per-channel statistics once
        mean, std = channel_stats(train.images)
    seed_everything(recipe.seed)  # the initial weights are part of the run: seed them too
    model = build_model(arch, num_classes=train.num_classes, **_input_kwargs(arch, train.images.shape[1]))
    out = Path(out)
    facts = run_facts(device_, recipe.seed)
    checkpointer = Checkpointer(out, fingerprint({"arch": arch, "data": data, "recipe": recipe.to_dict()}), "supervised")
    started = time.perf_counter()
    result = train_supervised(
        model, train.images, train.labels, normalize=normalizer(mean, std), recipe=recipe, device=device_,
        checkpointer=checkpointer, test=(test.images, test.labels), progress=progress,
        checkpoint_every_s=checkpoint_every_s,
    )
    loaded = LoadedModel(model.cpu(), arch, mean, std, data, train.classes)
    save_model(out / "model.pt", loaded, {"test_acc": result["test_acc"], "recipe": recipe.to_dict()})
    payload = {**facts, "kind": "train-teacher", "arch": arch, "data": data, "recipe": recipe.to_dict(),
               "precision": result["precision"], "channels_last": result["channels_last"],
               "test_acc": result["test_acc"], "wall_seconds": time.perf_counter() - started,
               "train_seconds": result["seconds"], "resumed_at": result["resumed_at"],
               "history": result["history"], **model_costs(model, tuple(train.images.shape[1:]))}
    atomic_write_json(out / "result.json", payload)
    return payload


def _input_kwargs(arch: str, channels: int) -> dict:
    return {} if channels == 3 or arch.startswith("digits") else {"in_channels": channels}


# ------------------------------------------------------------------------------------------ distill
def distill(
    *,
    teacher: LoadedModel,
    student_arch: str,
    fewshot,  # ImageSet with labels dropped
    test=None,  # labeled ImageSet or None
    config: GraftConfig,
    device: str = "auto",
    out: str | Path | None = None,
    progress: bool = True,
    manifest: dict | None = None,
    label: str = "",
    replace: list[int] | None = None,
) -> dict:
    """Graft ``student_arch`` into ``teacher`` on the few-shot images; evaluate both; write results.

    With ``replace`` (1-based block numbers) only those teacher blocks are replaced by the student's:
    the result is a hybrid (``build_model("hybrid", ...)``), its other blocks the teacher's own.
    """
    device_ = resolve_device(device)
    expected = getattr(teacher.model, "input_shape", None)
    if expected is not None and expected[0] != fewshot.images.shape[1]:
        raise GraftkdError(
            f"the few-shot images have {fewshot.images.shape[1]} channels but the teacher {teacher.arch} expects "
            f"{expected[0]}: convert the images (RGB vs grayscale)"
        )
    num_classes = _num_outputs(teacher.model, fewshot.images.shape[1:])
    if test is not None and test.labels is not None and test.num_classes != num_classes:
        raise GraftkdError(
            f"the teacher predicts {num_classes} classes but the test data {test.name} has {test.num_classes}: "
            "use a teacher trained on this dataset"
        )
    seed_everything(config.seed)  # the student's initial weights are part of the run: seed them too
    arch_options: dict = {}
    if replace:
        from dataclasses import replace as with_changes

        arch_options = {"teacher_arch": teacher.arch, "student_arch": student_arch, "replace": sorted(set(replace))}
        student = build_model("hybrid", num_classes=num_classes, **arch_options,
                              **_input_kwargs(student_arch, fewshot.images.shape[1]))
        kept = [i + 1 for i in range(len(student.blocks())) if i + 1 not in arch_options["replace"]]
        config = with_changes(config, inherit=kept or "none")  # kept blocks: the teacher's, frozen
    else:
        student = build_model(student_arch, num_classes=num_classes,
                              **_input_kwargs(student_arch, fewshot.images.shape[1]))
    input_shape = tuple(fewshot.images.shape[1:])
    norm = normalizer(teacher.mean, teacher.std)
    facts = run_facts(device_, config.seed)
    teacher_costs = model_costs(teacher.model, input_shape)
    out_dir = Path(out) if out is not None else None
    started = time.perf_counter()
    teacher_acc = None
    if test is not None:
        teacher_acc = evaluate_model(teacher.model.to(device_), test.images, test.labels, norm, device_)
    result = graft(
        teacher.model, student, fewshot.images, normalize=norm, config=config, device=device_,
        run_dir=out_dir, progress=progress,
    )
    student_acc = None
    if test is not None:
        student_acc = evaluate_model(result.student, test.images, test.labels, norm, device_)
    student_costs = model_costs(result.student.cpu(), input_shape)
    if replace:
        from graftkd.models.hybrid import block_params

        student_costs["blocks"] = [
            {"block": name, "replaced": i + 1 in arch_options["replace"], "teacher_params": before, "params": after}
            for i, (name, before, after) in enumerate(zip(teacher.model.block_names(), block_params(teacher.model),
                                                          block_params(result.student)))]
    payload = {
        **facts,
        "kind": "distill",
        "method": "graft",
        "label": label,
        "teacher": {"arch": teacher.arch, "source": teacher.source, "test_acc": teacher_acc, **teacher_costs},
        "student": {"arch": "hybrid" if replace else student_arch, "arch_options": arch_options or None,
                    "test_acc": student_acc, **student_costs},
        "fewshot": {"images": len(fewshot), "shots": result.shots, "manifest": manifest},
        "test": {"name": test.name, "images": len(test)} if test is not None else None,
        "protocol": "last-epoch student after the full schedule; the test set is used only for this report",
        "config": config.to_dict(),
        "graft": result.summary(),
        "wall_seconds": time.perf_counter() - started,
    }
    if out_dir is not None:
        loaded = LoadedModel(result.student, "hybrid" if replace else student_arch, teacher.mean, teacher.std,
                             "graftkd distill", teacher.classes)
        save_model(out_dir / "student.pt", loaded, {"test_acc": student_acc, "teacher": teacher.source,
                                                    **({"arch_options": arch_options} if replace else {})})
        atomic_write_json(out_dir / "result.json", payload)
        (out_dir / "checkpoint.pt").unlink(missing_ok=True)
    return payload


def _num_outputs(model: nn.Module, input_shape) -> int:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros((2, *input_shape), device=next(model.parameters()).device))
    model.train(was)
    return int(out.shape[1])


# ----------------------------------------------------------------------------------------- reports
def summary_table(payload: dict) -> str:
    """The end-of-run table: teacher vs student accuracy, size, compute, compression, time."""
    t, s = payload["teacher"], payload["student"]

    def acc(value):
        return "-" if value is None else f"{value:.2f}%"

    rows = [
        ("", "teacher", "student"),
        ("architecture", t["arch"], s["arch"]),
        ("test accuracy", acc(t.get("test_acc")), acc(s.get("test_acc"))),
        ("parameters", format_count(t["params"]), format_count(s["params"])),
        ("FLOPs / image", format_count(t["flops"]), format_count(s["flops"])),
        ("compression", "1.00x", f"{t['params'] / s['params']:.2f}x params, {t['flops'] / s['flops']:.2f}x FLOPs"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for block in s.get("blocks") or []:  # partial grafting: Table 3's per-block counts
        lines.append(f"  block {block['block']}: {format_count(block['teacher_params'])} -> "
                     f"{format_count(block['params'])}" + ("  (replaced)" if block["replaced"] else ""))
    few = payload["fewshot"]
    lines.append(
        f"few-shot: {few['images']} unlabeled images ({few['shots']} per class), wall time "
        f"{payload['wall_seconds']:.1f} s on {payload['device']}"
    )
    return "\n".join(lines)


def distill_full(
    student_arch: str,
    data: str,
    out: str | Path | None,
    recipe,
    teacher: str | None = None,
    teacher_arch: str | None = None,
    teachers_dir: str | None = None,
    device: str = "auto",
    progress: bool = True,
    limit_train: int | None = None,
) -> dict:
    """``graftkd train-kd``: full-data CE + KD (+ a feature distiller), one process or many (torchrun)."""
    from graftkd.data import load_dataset
    from graftkd.data.normalize import channel_stats, stats_for
    from graftkd.engine.fulldata import init_distributed, train_kd

    world, device = init_distributed(device)
    device_ = resolve_device(device)
    train = load_dataset(data, "train")
    test = load_dataset(data, "test")
    if train.labels is None or test.labels is None:
        raise GraftkdError(f"train-kd needs labeled train and test splits, but {data} has none")
    images, labels = train.images, train.labels
    if limit_train:
        from graftkd.engine.fulldata import training_subset

        keep = training_subset(labels, limit_train)
        images, labels = images[keep], labels[keep]
    loaded = None
    if teacher is not None:
        loaded = load_teacher(teacher, teacher_arch, train.num_classes, teachers_dir)
        mean, std = loaded.mean, loaded.std
    elif recipe.kd_weight > 0 or recipe.distiller:
        raise GraftkdError("--teacher is needed for KD and feature distillers (or pass --kd-weight 0 --distiller none)")
    else:
        mean, std = stats_for(train.dataset) if train.dataset else channel_stats(images)
    torch.manual_seed(recipe.seed)
    student = build_model(student_arch, num_classes=train.num_classes, **_input_kwargs(student_arch, images.shape[1]))
    facts = run_facts(device_, recipe.seed)
    started = time.perf_counter()
    result = train_kd(student, loaded.model if loaded else None, (images, labels), normalize=normalizer(mean, std),
                      recipe=recipe, device=device_, student_arch=student_arch,
                      teacher_arch=loaded.arch if loaded else "", test=(test.images, test.labels),
                      run_dir=out, world=world, progress=progress)
    from dataclasses import asdict

    payload = {**facts, "kind": "train-kd", "student_arch": student_arch, "teacher": loaded.source if loaded else None,
               "data": data, "train_images": len(images), "recipe": asdict(recipe), **result,
               "wall_seconds": time.perf_counter() - started,
               **model_costs(student, tuple(images.shape[1:]))}
    if out is not None and world.main:
        out = Path(out)
        save_model(out / "student.pt", LoadedModel(student.cpu(), student_arch, mean, std, data, train.classes),
                   {"test_acc": result["last_epoch_test_acc"], "recipe": asdict(recipe)})
        atomic_write_json(out / "result.json", payload)
    return payload
