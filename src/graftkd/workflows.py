"""One function per CLI command: load inputs, validate them up front, run, write results atomically."""
from __future__ import annotations

import json
import time
from dataclasses import replace as with_changes
from pathlib import Path

import torch

from graftkd.engine.checkpoint import Checkpointer, fingerprint
from graftkd.engine.evaluate import evaluate_model
from graftkd.files import atomic_write_json
from graftkd.engine.recipe import Recipe
from graftkd.engine.runtime import resolve_device, run_facts, seed_everything
from graftkd.engine.supervised import TeacherRecipe, train_supervised
from graftkd.errors import GraftkdError
from graftkd.graft import GraftConfig, GraftResult, graft
from graftkd.models import build_model
from graftkd.models.profile import format_count
from graftkd.loaded import (  # noqa: F401 - re-exported: the commands' callers load models from here
    STUDENT_FORMAT, LoadedModel, load_model_file, load_teacher, model_costs, normalizer, num_outputs, save_model,
    saved_arch, teacher_accuracy, teacher_status,
)
from graftkd.refine import (  # noqa: F401 - re-exported for the same reason
    FADE, REPAIRED_ENOUGH, DeriveOptions, label_free_estimate, refine_derived, resolve_refinement, run_method, try_derive,
)


# ------------------------------------------------------------------------------------------ evaluate


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
    num_classes = num_outputs(teacher.model, fewshot.images.shape[1:])
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
        record, init = try_derive(teacher.model.to(device_), student.to(device_), fewshot.images, norm, device_,
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
        result, derived_facts = run_method(method, teacher, student, student_arch, fewshot, norm, config, device_,
                                            out_dir, progress, method_recipe, world, method_options)
    elif record is not None:
        result, derived_facts = refine_derived(teacher, student, record, fewshot, norm, config, derive, device_,
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
    label_free = label_free_estimate(result.student, teacher.model, fewshot.images, norm, config, device_,
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
    fade_steps = (payload.get("fade") or {}).get("steps") or 0
    for part in ("graft", "refine"):
        stages = (payload.get(part) or {}).get("stages") if isinstance(payload.get(part), dict) else None
        for index, stage in enumerate(stages or []):
            curve = stage.get("loss_curve") or []
            start, since = (curve[0], "where it started") if curve else (None, "")
            if part == "refine" and index == 0 and fade_steps and stage.get("steps"):
                # a fading student starts as the teacher itself: its loss rises while the dropped units and
                # channels fade out, and the training proper starts where they are gone
                faded = stage["epochs"] * fade_steps / stage["steps"]
                after = [point for point in curve if point[0] >= faded]
                start, since = (after[0], "where the fading ended") if after else (None, "")
            if start is not None and len(curve) >= 2 and curve[-1][1] > start[1]:
                warnings.append(f"the loss of stage '{stage.get('name')}' ended above {since} "
                                f"({start[1]:.4g} -> {curve[-1][1]:.4g}): the student got worse at matching the "
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
