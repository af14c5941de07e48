"""One function per CLI command: load inputs, validate them up front, run, write results atomically."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace as with_changes
from pathlib import Path

import torch
from torch import nn

from graftkd.engine.checkpoint import Checkpointer, fingerprint
from graftkd.engine.evaluate import evaluate_model
from graftkd.files import atomic_torch_save, atomic_write_json
from graftkd.engine.recipe import Recipe
from graftkd.engine.runtime import resolve_device, run_facts, seed_everything
from graftkd.engine.supervised import TeacherRecipe, train_supervised
from graftkd.errors import GraftkdError
from graftkd.graft import GraftConfig, GraftResult, graft
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
    derive: DeriveOptions | None = None,
    measure_teacher: bool = False,
    method: str | None = None,
    method_options: dict | None = None,
    student_reason: str | None = None,
    method_recipe: Recipe | None = None,
) -> dict:
    """Distill ``student_arch`` from ``teacher`` on the few-shot images; evaluate both; write results.

    ``derive.init``: ``derived`` builds the student from the teacher's own weights (units and channels
    chosen, :mod:`graftkd.derive`) and refines it (``derive.refine``); ``fresh`` grafts freshly initialised
    blocks (the paper); ``auto`` (the default) derives wherever the student fits inside the teacher.
    With ``replace`` (1-based block numbers) only those teacher blocks are replaced by the student's:
    the result is a hybrid (``build_model("hybrid", ...)``), its other blocks the teacher's own.
    A registered teacher's test accuracy is the registry's record when ``test`` is the data it was measured
    on; ``measure_teacher`` measures it again. ``method`` (a registered few-shot method other than
    ``graft``, e.g. ``kd``, ``fitnet``, ``fskd``) runs that method on a fresh student with the budget a grid
    cell gives it (the grafting schedule's epochs), instead of derivation or grafting.
    """
    derive = derive or DeriveOptions()
    from graftkd.engine.distributed import init_distributed

    world, device = init_distributed(device)  # under torchrun: join the group (a no-op for one process)
    progress = progress and world.main
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
    teacher_acc, teacher_acc_from = None, None
    if test is not None:
        teacher_acc, teacher_acc_from = teacher_accuracy(teacher, test, norm, device_, measure_teacher,
                                                         progress)
    init = {"requested": derive.init, "used": "fresh", "why": derive.reason or "--init fresh"}
    record = None
    if method is not None:
        from graftkd.distill.base import build_method

        own = build_method(method, method_options).own_student
        init = {"requested": derive.init, "used": "method's own" if own else "fresh",
                "why": f"--method {method} builds its student from the teacher" if own else f"--method {method}"}
    elif derive.init != "fresh" and not replace:
        record, init = _try_derive(teacher.model.to(device_), student.to(device_), fewshot.images, norm, device_,
                                   derive)
    elif replace:
        init["why"] = "partial grafting (--replace) keeps the paper's fresh blocks"
    derived_facts: dict = {}
    loop_path = (method is not None and method != "graft" and method_recipe is not None) or (
        method is None and record is not None and derive.refine in ("kd", "auto"))
    if world.size > 1 and not loop_path:
        raise GraftkdError("under torchrun, distill trains in the shared loop only: a derived student refined by "
                           "patient KD (the default), or --method kd|fitnet|whole|feature_kd --recipe patient")
    if method is not None and method != "graft":
        result, derived_facts = _run_method(method, teacher, student, student_arch, fewshot, norm, config, device_,
                                            out_dir, progress, method_recipe, world, method_options)
    elif record is not None:
        result, derived_facts = _refine_derived(teacher, student, record, fewshot, norm, config, derive, device_,
                                                out_dir, progress, world)
    else:
        result = graft(
            teacher.model, student, fewshot.images, normalize=norm, config=config, device=device_,
            run_dir=out_dir, progress=progress,
        )
    student_acc = None
    if test is not None:
        student_acc = evaluate_model(result.student, test.images, test.labels, norm, device_, progress=progress,
                                     desc="test: student")
    label_free = _label_free(result.student, teacher.model, fewshot.images, norm, config, device_,
                             mixed=(record is not None and derive.recipe.mix != "none")
                             or (method_recipe is not None and method_recipe.mix != "none"))
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
        # where a re-run of the same command picked this run up from its checkpoint (None: one go)
        "resumed": getattr(result, "resumed", None) or (derived_facts.get("refine") or {}).get("resumed"),
        "method": derived_facts.get("method", "graft"),
        "init": init,
        "label": label,
        "teacher": {"arch": teacher.arch, "source": teacher.source, "test_acc": teacher_acc,
                    "test_acc_from": teacher_acc_from, **teacher_costs},
        "student": {"arch": "hybrid" if replace else student_arch, "arch_options": arch_options or None,
                    "chosen_because": student_reason,
                    "test_acc": student_acc, **student_costs},
        "fewshot": {"images": len(fewshot), "shots": result.shots if manifest else None, "manifest": manifest,
                    "unlabeled": _folder_listing(fewshot, out_dir) if manifest is None and fewshot.paths else None},
        "test": {"name": test.name, "images": len(test)} if test is not None else None,
        "protocol": "last-epoch student after the full schedule; the test set is used only for this report",
        "config": {**config.to_dict(), "shots": config.shots if config.shots is not None else result.shots},
        "graft": result.summary() if isinstance(result, GraftResult) else None,
        "derivation": record.to_dict() if record is not None else None,
        **derived_facts,
        "label_free": label_free,
        "wall_seconds": time.perf_counter() - started,
    }
    payload["warnings"] = quality_warnings(payload)
    payload["world_size"] = world.size
    if out_dir is not None and world.main:  # one writer: every process holds the same student
        classes = teacher.classes or (list(test.classes) if test is not None and test.classes else None)
        loaded = LoadedModel(result.student, "hybrid" if replace else student_arch, teacher.mean, teacher.std,
                             "graftkd distill", classes)
        save_model(out_dir / "student.pt", loaded, {"test_acc": student_acc, "teacher": teacher.source,
                                                    **({"arch_options": arch_options} if replace else {})})
        atomic_write_json(out_dir / "result.json", payload)
        (out_dir / "checkpoint.pt").unlink(missing_ok=True)
    return payload


@dataclass(frozen=True)
class DeriveOptions:
    """How ``distill`` builds and refines a student from the teacher's own weights (``graftkd.derive``)."""

    init: str = "auto"  # auto | derived | fresh
    reason: str = ""  # why ``init`` is what it is, when the caller resolved it (recorded in result.json)
    depth_rule: str = "even"  # even | first | greedy
    width_rule: str = "l1"  # l1 | activation
    bn_start: str = "auto"  # teacher | reestimate (on the images) | auto (the smaller few-shot logit error)
    # kd (patient recipe) | graft (block then network stages, paper recipe) | none | auto: repair, refinement and
    # loss chosen from the derivation (``resolve_refinement``; `distill`'s default when none of them is given)
    refine: str = "kd"
    repair: bool = False  # closed-form least-squares 1x1 corrections before any step (FSKD, generalised)
    # the repair's regression also sees this many augmented copies (crop + flip) of every few-shot image
    repair_views: int = 0
    repair_ridge: float = 1e-4  # ridge towards the identity, relative to the Gram matrix's mean diagonal
    loss: str = "kd"  # kd | feature_kd (KD plus the teacher's feature maps at every block boundary) | fitnet
    unit_features: bool = False  # feature_kd: also match every kept unit's output to the teacher's stream
    # > 0 (depth derivations, patient KD on logits): the student starts as the whole teacher and the dropped units
    # fade out linearly over this share of the budget's steps, instead of being cut before the first step;
    # None: refine 'auto' chooses (``resolve_refinement``), any other refinement cuts them (0)
    fade: float | None = None
    loss_options: dict = field(default_factory=dict)  # the loss method's own options, e.g. {"temperature": 1.0}
    recipe: Recipe = field(default_factory=Recipe)

    def __post_init__(self) -> None:
        from graftkd.derive import DEPTH_RULES, INITS, WIDTH_RULES

        for name, value, allowed in (("init", self.init, INITS), ("depth rule", self.depth_rule, DEPTH_RULES),
                                     ("width rule", self.width_rule, WIDTH_RULES),
                                     ("bn start", self.bn_start, ("auto", "teacher", "reestimate")),
                                     ("refine", self.refine, ("auto", "kd", "graft", "none")),
                                     ("loss", self.loss, ("kd", "feature_kd", "fitnet"))):
            if value not in allowed:
                raise GraftkdError(f"unknown {name} '{value}': use one of {', '.join(allowed)}")
        if self.refine == "auto" and (self.repair or self.loss != "kd"):
            raise GraftkdError("refine 'auto' chooses the repair and the loss itself: give --refine kd|none to set them")
        if self.fade is not None and not 0.0 <= self.fade <= 1.0:
            raise GraftkdError(f"fade must be a share of the budget in [0, 1] (got {self.fade}); 0 cuts the dropped "
                               "units before the first step")
        if self.fade and (self.repair or self.refine not in ("kd", "auto") or self.loss != "kd"):
            raise GraftkdError("fade trains the whole teacher while its dropped units fade out: it goes with the "
                               "patient KD refinement on logits only (no --repair, --refine kd or auto, --refine-loss kd)")
        if self.repair_views < 0 or self.repair_ridge < 0:
            raise GraftkdError(f"repair views and ridge must be >= 0 (got {self.repair_views}, {self.repair_ridge})")

    def to_dict(self) -> dict:
        return {"init": self.init, "reason": self.reason, "depth_rule": self.depth_rule, "width_rule": self.width_rule,
                "bn_start": self.bn_start, "repair": self.repair, "refine": self.refine, "loss": self.loss,
                **({"repair_views": self.repair_views, "repair_ridge": self.repair_ridge} if self.repair else {}),
                "unit_features": self.unit_features, "fade": self.fade, "loss_options": dict(self.loss_options),
                "recipe": self.recipe.to_dict()}


def _folder_listing(images, out_dir: Path | None) -> dict:
    """An unlabeled folder's few-shot set as data: every file's relative path and sha256, written as
    ``unlabeled.json`` beside ``result.json`` (the record keeps the listing's own sha256)."""
    import hashlib

    root = Path(images.name)
    files = [{"path": rel, "sha256": hashlib.sha256((root / rel).read_bytes()).hexdigest()}
             for rel in images.paths if (root / rel).is_file()]
    listing = {"root": str(root), "files": files, "skipped": list(images.skipped or [])}
    text = json.dumps(listing, indent=1, sort_keys=True)
    if out_dir is not None:
        from graftkd.files import atomic_write_text

        atomic_write_text(out_dir / "unlabeled.json", text + "\n")
    return {"root": str(root), "files": len(files), "skipped": len(listing["skipped"]),
            "listing": "unlabeled.json" if out_dir is not None else None,
            "sha256": hashlib.sha256(text.encode()).hexdigest()}


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


def _try_derive(teacher: nn.Module, student: nn.Module, images: torch.Tensor, norm: nn.Module,
                device: torch.device, options: DeriveOptions):
    """Derive ``student`` from the teacher, or say why not; ``--init derived`` makes a failure an error."""
    from graftkd.derive import Underivable, derive_student
    from graftkd.graft.blocks import resolve_blocks, trace_boundaries

    # damaged weights (NaN) and a forward that is not its blocks' composition are refused before any work
    trace_boundaries(teacher, resolve_blocks(teacher, role="teacher"),
                     torch.zeros((2, *images.shape[1:]), device=device), role="teacher")
    with torch.no_grad():
        inputs = norm.to(device)(images.to(device)).float()
    try:
        record = derive_student(teacher, student, tuple(images.shape[1:]), inputs=inputs,
                                depth_rule=options.depth_rule, width_rule=options.width_rule)
    except Underivable as exc:
        if options.init == "derived":
            raise GraftkdError(f"--init derived: {exc}; use --init fresh for this pair") from exc
        return None, {"requested": options.init, "used": "fresh", "why": f"not derivable: {exc}"}
    if not record.derived_blocks:
        if options.init == "derived":
            raise GraftkdError(f"--init derived: no block of the student fits inside the teacher "
                               f"({record.fallback_reason}); use --init fresh for this pair")
        return None, {"requested": options.init, "used": "fresh",
                      "why": f"no block derivable: {record.fallback_reason}"}
    fresh = record.fresh_blocks
    why = ("every block derived from the teacher" if not fresh else
           f"blocks {', '.join(str(i + 1) for i in fresh)} fresh, the others derived")
    return record, {"requested": options.init, "used": "derived", "why": why}


def _refine_derived(teacher: LoadedModel, student: nn.Module, record, fewshot, norm: nn.Module, config: GraftConfig,
                    options: DeriveOptions, device: torch.device, out_dir: Path | None, progress: bool, world=None):
    """BatchNorm at the start, then the refinement; returns an object with ``.student`` and the facts to record."""
    from graftkd.distill.base import build_method

    images = fewshot.images.to(device)
    facts: dict = {"derive": options.to_dict()}
    if options.fade and not _units_chosen_only(record):
        raise GraftkdError(f"fade {options.fade:g}: the dropped units fade out of the whole teacher, so every block "
                           "must be derived by choosing units only; this derivation chose channels or left blocks "
                           "fresh (see its record): leave fade at 0")
    resolved = None
    if options.refine == "auto":
        resolved = resolve_refinement(record)
        fade = resolved["fade"] if options.fade is None else options.fade
        options = with_changes(options, refine="kd", repair=resolved["repair"], loss=resolved["loss"], fade=fade)
        facts["resolved"] = resolved
    if options.fade is None:
        options = with_changes(options, fade=0.0)
    facts["derive"]["fade"] = options.fade
    facts["method"] = f"derived+{options.refine}"
    inputs = norm.to(device)(images).float()
    if options.repair:
        # the corrections make each layer's pre-norm output the teacher's, so the norms keep the teacher's statistics
        from graftkd.derive.repair import repair

        rows = inputs
        if options.repair_views > 0:  # more rows for the least squares: crop-and-flip copies, seeded by the run
            from graftkd.data import resolve_augment

            views = resolve_augment(fewshot.dataset, config.padding, config.flip)
            generator = torch.Generator().manual_seed(int(config.seed) + 104_729)
            rows = torch.cat([inputs] + [norm(views(images.cpu(), generator).to(device)).float()
                                         for _ in range(options.repair_views)])
        facts["repair"] = {**repair(teacher.model, student, record, rows, ridge=options.repair_ridge, progress=progress),
                           "images": len(rows), "augmented_views": options.repair_views}
        facts["bn_start"] = {"rule": "teacher (repair)", "used": "teacher"}
    elif options.fade:
        facts["bn_start"] = {"rule": "teacher (fade: the start is the whole teacher)", "used": "teacher"}
    else:
        facts["bn_start"] = _bn_start(teacher.model, student, record, inputs, options.bn_start)
    if resolved is not None and resolved["stop_at"] is not None:
        # the label-free estimate of the repaired student (the same pool and views the run reports at its end)
        estimate = _label_free(student, teacher.model, images, norm, config, device, mixed=options.recipe.mix != "none")
        resolved["agreement_after_repair"] = estimate["agreement"]
        if estimate["agreement"] >= resolved["stop_at"]:
            options = with_changes(options, refine="none")
            resolved["refine"], resolved["loss"] = "none", None
            resolved["why"] += (f"; the repaired student agrees with the teacher on {estimate['agreement']:.1f} % of "
                                f"the held-out views (>= {resolved['stop_at']:g} %): no training")
        else:
            resolved["why"] += (f"; the repaired student agrees on {estimate['agreement']:.1f} % of the held-out views "
                                f"(< {resolved['stop_at']:g} %): patient KD plus feature maps")
        facts["method"] = f"derived+{options.refine}"
    num_classes = _num_outputs(teacher.model, images.shape[1:])
    shots = config.shots or max(1, len(images) // num_classes)
    started = time.perf_counter()
    if options.refine == "graft":
        graft_config = with_changes(config, freeze_norm_stats=True, inherit="none")
        result = graft(teacher.model, student, images, normalize=norm, config=graft_config, device=device,
                       run_dir=out_dir, progress=progress, init_adapters=lambda plan: _derived_adapters(plan, record))
        facts["refine"] = result.summary()
        return result, facts
    if options.refine == "kd":
        recipe = options.recipe
        trained = student
        if options.fade:
            from graftkd.derive.fade import FadingStudent

            trained = FadingStudent(teacher.model, record.depth, round(options.fade * recipe.steps)).to(device)
            facts["fade"] = {"share": options.fade, "steps": trained.steps, "faded_units": trained.faded}
        task = _few_shot_task(teacher, trained, images, norm, config, device, out_dir, progress, world,
                              batch_size=recipe.batch_size, epochs=recipe.chunks, lr=recipe.lr, shots=shots,
                              num_classes=num_classes, recipe=recipe, inherit="none")
        method = build_method(options.loss, options.loss_options)
        if options.loss == "feature_kd":
            method.select = _feature_channels(student, record)
            if options.unit_features:
                method.pairs = _unit_pairs(record)
        outcome = method.run(task)
        if trained is not student:
            student.load_state_dict(trained.student_state_dict(student), strict=True)
        facts["refine"] = {"stages": outcome.stages, **outcome.extra}
    else:
        facts["refine"] = None
    student.eval()
    return _Refined(student, shots, time.perf_counter() - started), facts


def _units_chosen_only(record) -> bool:
    """True when the whole student came from the teacher by choosing units (no channel chosen, no block fresh)."""
    return (record.whole and record.depth is not None and bool(record.depth.selections)
            and not record.fresh_blocks and not any("channels" in row["status"] for row in record.blocks))


#: the share of the budget over which a depth derivation's dropped units fade out when the user chose nothing
FADE = 0.25

#: the repaired student's label-free agreement (%) from which training it on the few images is left out
REPAIRED_ENOUGH = 95.0


def resolve_refinement(record) -> dict:
    """What a derived student gets when the user chose nothing (``refine`` 'auto'), and why.

    The rule comes from the validation split (``results/cifar10-derived/dev``, never test):
    - only units chosen (a depth derivation): patient KD on logits, no repair. Repair then KD gave 72.9 % against
      75.5 %, and KD plus feature maps 75.5 against 74.8 (the cheaper KD). The student starts as the whole teacher
      and the dropped units fade out over the first ``FADE`` of the budget (``results/cifar10-derived/dev-amx``:
      at 128k samples 83.8 against 81.6 % at K=10, 72.0 against 66.0 % at K=1);
    - channels chosen, the whole model derived at once: the closed-form repair first. If the repaired student
      agrees with the teacher on at least ``REPAIRED_ENOUGH`` % of the held-out views it is not trained
      (vgg16-graft: repair alone 96.7 %, KD after it 95.1-95.8 %); otherwise patient KD plus feature maps
      (half-width VGG: 89.1 %, against 87.1 for KD after repair and 86.9 for the repair alone);
    - any block fresh: patient KD (the fresh blocks must be trained, and the repair needs one whole derivation).
    ``stop_at`` is the agreement threshold to check after the repair (None: no check); ``fade`` the share of the
    budget over which dropped units fade out (0: cut before the first step)."""
    statuses = [row["status"] for row in record.blocks]
    fresh = [row["block"] for row in record.blocks if row["status"] == "fresh"]
    if fresh:
        return {"repair": False, "loss": "kd", "refine": "kd", "stop_at": None, "fade": 0.0,
                "why": f"blocks {', '.join(map(str, fresh))} are fresh: patient KD trains them"}
    if any("channels" in status for status in statuses) and record.whole:
        return {"repair": True, "loss": "feature_kd", "refine": "kd", "stop_at": REPAIRED_ENOUGH, "fade": 0.0,
                "why": "channels chosen: the closed-form repair first"}
    if _units_chosen_only(record):
        return {"repair": False, "loss": "kd", "refine": "kd", "stop_at": None, "fade": FADE,
                "why": f"units chosen: patient KD from the whole teacher, the dropped units fading out over the first "
                       f"{FADE:g} of the budget"}
    return {"repair": False, "loss": "kd", "refine": "kd", "stop_at": None, "fade": 0.0,
            "why": "units chosen" if any("units" in status for status in statuses) else "every block inherited"}


def _feature_channels(student: nn.Module, record) -> dict[str, torch.Tensor]:
    """Feature path -> teacher channels the derived student keeps there (its last conv/linear's choice)."""
    if not record.whole or record.width is None or not hasattr(student, "feature_paths"):
        return {}
    layers = {la.path: la for la in record.width.layers}
    order = [n for n, _ in student.named_modules()]
    writers = [n for n in order if n in layers]
    select = {}
    for path in student.feature_paths():
        # the last conv/linear at or before the end of the module at ``path`` writes its output channels
        end = max(i for i, n in enumerate(order) if n == path or n.startswith(f"{path}.")) if path else len(order) - 1
        before = [n for n in writers if order.index(n) <= end]
        layer = layers[before[-1]] if before else None
        if layer is not None and len(layer.out_keep) < layer.teacher_out:
            select[path] = layer.out_keep
    return select


def _unit_pairs(record) -> list[tuple[str, str]]:
    """(student unit, teacher unit) feature spots after a depth derivation: student unit j of a container that
    took teacher units i_0 < i_1 < ... stands for teacher units i_j .. i_{j+1} - 1, so its output should be the
    teacher's stream after unit i_{j+1} - 1 (after the container's last unit, for the last one)."""
    if not record.whole or record.depth is None:
        return []
    pairs = []
    for path, chosen in record.depth.selections.items():
        teacher_path = record.depth.teacher_path(path)
        ends = [nxt - 1 for nxt in chosen[1:]] + [record.depth.lengths[path] - 1]
        for j, end in enumerate(ends):
            pairs.append((f"{path}.{j}" if path else str(j), f"{teacher_path}.{end}" if teacher_path else str(end)))
    return pairs


@torch.no_grad()
def _bn_start(teacher: nn.Module, student: nn.Module, record, inputs: torch.Tensor, rule: str) -> dict:
    """BatchNorm statistics of the derived student before any step.

    ``teacher`` keeps the teacher's; ``reestimate`` measures them on the few-shot images; ``auto`` keeps
    whichever gives the smaller few-shot logit error against the teacher (label-free). Dropped units shift
    the residual stream that later norms see, so depth derivations usually need re-estimation, while
    narrowed layers keep the teacher's (results/cifar10-vgg16-graft/NOTES.md).
    """
    from graftkd.derive.depth import logit_error_fn
    from graftkd.engine.bn import reestimate_batchnorm

    error = logit_error_fn(teacher, inputs)
    kept = {k: v.clone() for k, v in student.state_dict().items()}
    before = error(student)
    if rule == "teacher":
        return {"rule": rule, "used": "teacher", "logit_rel_error_teacher_stats": before}
    reestimate_batchnorm(student, [inputs])
    after = error(student)
    used = "reestimate" if rule == "reestimate" or after < before else "teacher"
    if used == "teacher":
        student.load_state_dict(kept)
    return {"rule": rule, "used": used, "logit_rel_error_teacher_stats": before,
            "logit_rel_error_reestimated": after}


@dataclass
class _Refined:
    student: nn.Module
    shots: int
    seconds: float


def _few_shot_task(teacher: LoadedModel, student: nn.Module, images: torch.Tensor, norm: nn.Module,
                   config: GraftConfig, device: torch.device, out_dir: Path | None, progress: bool, world, *,
                   recipe: Recipe | None, **budget):
    """The one place a ``distill`` run's FewShotTask is built: what the config says (seed, augmentation,
    precision, checkpoints) plus the path's own budget (batch size, epochs, rate, inheritance, ...)."""
    from graftkd.distill.base import FewShotTask
    from graftkd.graft.api import augmenter

    return FewShotTask(
        teacher=teacher.model.to(device).eval(), student=student.to(device), images=images, normalize=norm.to(device),
        device=device, generator=seed_everything(config.seed), augment=augmenter(config), precision=config.precision,
        compile=config.compile,
        teacher_arch=teacher.arch, run_dir=out_dir, checkpoint_every_s=config.checkpoint_every_s,
        log_every=1 if recipe is not None else config.log_every, progress=progress, seed=config.seed,
        padding=config.padding, flip=config.flip, recipe=recipe, world=world, **budget)


def _run_method(name: str, teacher: LoadedModel, student: nn.Module, student_arch: str, fewshot, norm: nn.Module,
                config: GraftConfig, device: torch.device, out_dir: Path | None, progress: bool,
                recipe: Recipe | None = None, world=None, options: dict | None = None):
    """A registered few-shot method on ``student`` with a grid cell's budget (``recipe``: the patient recipe's
    sample budget instead, for methods that train in the shared loop); returns the result and its facts.
    ``options``: the method's own (``--method-option KEY=VALUE``)."""
    from graftkd.distill.base import LossMethod, build_method
    from graftkd.graft.schedule import batch_size_for, paper_budget

    runner = build_method(name, options)
    images = fewshot.images.to(device)
    num_classes = _num_outputs(teacher.model, images.shape[1:])
    shots = config.shots or max(1, len(images) // num_classes)
    batch_size = config.batch_size or batch_size_for(shots, len(images))
    if recipe is not None:
        if not isinstance(runner, LossMethod):
            raise GraftkdError(f"--recipe patient needs a method that trains in the shared loop (kd, fitnet, whole, "
                               f"feature_kd); '{name}' has its own schedule: use --recipe paper")
        epochs, lr, batch_size = recipe.chunks, recipe.lr, recipe.batch_size
    else:
        epochs, lr = paper_budget(teacher.model, student, tuple(images.shape[1:]), config.schedule, batch_size,
                                  config.inherit)
    task = _few_shot_task(teacher, student, images, norm, config, device, out_dir, progress, world,
                          batch_size=batch_size, epochs=epochs, lr=lr, shots=shots, num_classes=num_classes,
                          recipe=recipe, inherit=config.inherit, student_arch=student_arch, mixup=config.mixup,
                          schedule=config.schedule)
    started = time.perf_counter()
    outcome = runner.run(task)
    facts = {"method": name, "method_options": runner.options,
             "budget": {"epochs": epochs, "batch_size": batch_size, "lr": lr},
             "recipe": recipe.to_dict() if recipe is not None else {"name": "paper"},
             "refine": {"stages": outcome.stages, **outcome.extra}}
    return _Refined(outcome.student.eval(), shots, time.perf_counter() - started), facts


def _derived_adapters(plan, record) -> None:
    """Adapters start as the derivation's channel choice at every cut (He init where a side is fresh).

    Block l's last conv/linear says which teacher channels its output holds (adapter out), block l+1's
    first one which teacher channels it reads (adapter in); derived whole, the two agree and the pair is
    the identity, so the grafted chain starts as the derived student.
    """
    model_paths = {id(m): n for n, m in plan.student.named_modules()}

    def keep(index: int, first: bool):
        if index not in record.derived_blocks:
            return None
        block = plan.student_blocks[index]
        layers = [(n, m) for n, m in block.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        if not layers:
            return None
        view_path, module = layers[0] if first else layers[-1]
        path = model_paths[id(module)] if record.whole else view_path  # per-block plans speak in view paths
        return record.input_channels(index, path) if first else record.output_channels(index, path)

    for cut in plan.adapter_cuts:
        out_keep, in_keep = keep(cut, first=False), keep(cut + 1, first=True)
        if out_keep is not None:
            plan.scions[cut].adapter_out.set_channel_selection(out_keep)
        if in_keep is not None:
            plan.scions[cut + 1].adapter_in.set_channel_selection(in_keep)


def _label_free(student: nn.Module, teacher: nn.Module, images: torch.Tensor, norm: nn.Module, config: GraftConfig,
                device: torch.device, mixed: bool) -> dict:
    """Top-1 agreement and KL on a held-out pool of augmented views (its own seed, never trained on)."""
    from graftkd.engine.agreement import agreement, agreement_pool
    from graftkd.graft.api import augmenter

    with torch.no_grad():
        pool = agreement_pool(images.to(device), norm.to(device), augmenter(config), mixed=mixed)
    return agreement(student.to(device), teacher.to(device), pool)


def _num_outputs(model: nn.Module, input_shape) -> int:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros((2, *input_shape), device=next(model.parameters()).device))
    model.train(was)
    return int(out.shape[1])


# ----------------------------------------------------------------------------------------- reports
AGREEMENT_WARNING = 70.0  # label-free agreement (%) below which a run ends with a warning


def quality_warnings(payload: dict) -> list[str]:
    """What a user without labels should know about a finished run, each with what to try."""
    warnings = []
    free = payload.get("label_free") or {}
    derived = (payload.get("init") or {}).get("used") == "derived"
    if free.get("agreement") is not None and free["agreement"] < AGREEMENT_WARNING:
        advice = ("more images per class or a longer --samples budget" if derived else
                  "more images per class, or a student that fits inside the teacher (derived from its weights: "
                  "`graftkd students --teacher ...`)")
        warnings.append(f"the label-free agreement is low ({free['agreement']:.1f}% < {AGREEMENT_WARNING:g}%), so "
                        f"expect a test accuracy far below the teacher's; {advice} may help")
    for part in ("graft", "refine"):
        stages = (payload.get(part) or {}).get("stages") if isinstance(payload.get(part), dict) else None
        for stage in stages or []:
            curve = stage.get("loss_curve") or []
            if len(curve) >= 2 and curve[-1][1] > curve[0][1]:
                warnings.append(f"the loss of stage '{stage.get('name')}' ended above where it started "
                                f"({curve[0][1]:.4g} -> {curve[-1][1]:.4g}): the student got worse at matching the "
                                "teacher; lower the learning rate or raise the budget")
    return warnings


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
    free = payload.get("label_free")
    if free:
        lines.append(f"label-free estimate: the student agrees with the teacher on {free['agreement']:.1f}% of "
                     f"{free['views']} held-out views of the few-shot images (KL {free['kl']:.3f})")
    lines += [f"warning: {w}" for w in payload.get("warnings") or []]
    init = payload.get("init")
    if init:
        lines.append(f"start: {init['used']} ({init['why']})")
    few = payload["fewshot"]
    lines.append(
        f"few-shot: {few['images']} unlabeled images"
        + (f" ({few['shots']} per class)" if few.get("manifest") else " (from a folder: classes unknown)")
        + ", wall time "
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
    from graftkd.distill.fulldata import init_distributed, train_kd

    world, device = init_distributed(device)
    device_ = resolve_device(device)
    train = load_dataset(data, "train")
    test = load_dataset(data, "test")
    if train.labels is None or test.labels is None:
        raise GraftkdError(f"train-kd needs labeled train and test splits, but {data} has none")
    images, labels = train.images, train.labels
    if limit_train:
        from graftkd.distill.fulldata import training_subset

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
