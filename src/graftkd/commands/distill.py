"""`graftkd distill`: a student from a teacher and a few unlabeled images, by any few-shot method; the
:func:`distill` workflow behind it, and what a finished run tells its user (:func:`quality_warnings`,
:func:`summary_table`)."""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace as with_changes
from pathlib import Path

from graftkd.commands.common import add_common, add_teacher, check_out_dir, input_kwargs
from graftkd.engine.evaluate import evaluate_model
from graftkd.engine.recipe import Recipe
from graftkd.engine.runtime import resolve_device, run_facts, seed_everything
from graftkd.errors import GraftkdError
from graftkd.files import atomic_write_json
from graftkd.graft import GraftConfig, GraftResult, graft
from graftkd.loaded import (
    LoadedModel, load_teacher, model_costs, normalizer, num_outputs, save_model, teacher_accuracy,
)
from graftkd.models import build_model
from graftkd.models.profile import format_count
from graftkd.refine import DeriveOptions, label_free_estimate, refine_derived, run_method, try_derive
from graftkd.schema import add_options, build_options, fill_defaults, with_overrides

# where `graftkd distill` differs from the library's GraftConfig: a user's run compiles where it pays (the library
# and the grids stay eager, as the committed cells ran)
DISTILL_DEFAULTS = {"compile": "auto"}


def _int_list(text: str) -> list[int] | int:
    parts = [int(p) for p in text.split(",") if p.strip()]
    return parts[0] if len(parts) == 1 else parts


def _method_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings as a dict; values read as YAML scalars (0.5, true, pkt)."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise GraftkdError(f"--method-option {pair!r}: write KEY=VALUE, e.g. distiller=pkt")
        options[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return options


NAME = "distill"
HELP = ("a compact student from a teacher and a few unlabeled images: derived from its weights where it fits, "
        "else grafted")


# GraftConfig's fields that are not grafting's schedule: how the images are augmented (every path uses it) and
# how the run executes; the help lists them with those instead of with grafting
_AUGMENT_FIELDS = ("augment", "padding", "flip")
_RUN_FIELDS = ("precision", "compile", "checkpoint_every_s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    # options that set a config field are declared once, on the field (schema.option): name, type, choices, help;
    # they are grouped by what they decide, so that `--help` reads as the run does
    models = p.add_argument_group("teacher and student")
    add_teacher(models)
    models.add_argument("--student-arch", required=True,
                        help="zoo architecture of the student (e.g. resnet20), or auto[:Nx]: the zoo student closest "
                             "to N times fewer parameters (3 by default) that can be derived from the teacher "
                             "(`graftkd students --teacher NAME` lists them)")
    images = p.add_argument_group("the few-shot images")
    src = images.add_mutually_exclusive_group()
    src.add_argument("--fewshot", help="few-shot manifest written by `graftkd fewshot`")
    src.add_argument("--data", help="labeled source to sample K per class from (labels are then dropped); "
                                    "default with --k: the registered teacher's dataset, else --test-data")
    src.add_argument("--unlabeled", help="a folder of unlabeled images: the few-shot set as is")
    images.add_argument("--k", type=int, help="images per class (with --data)")
    images.add_argument("--subset", type=int, default=0,
                        help="with --data: which of several disjoint K-per-class subsets to draw (0, 1, ...)")
    images.add_argument("--test-data", help="labeled data whose 'test' split is used for reporting only")
    images.add_argument("--num-classes", type=int, help="classes the teacher predicts (default: from the data)")
    images.add_argument("--on-bad-image", default="error", choices=["error", "skip"],
                        help="an unreadable image in --unlabeled: stop with its name (error, the default) or leave "
                             "it out")
    add_options(images, GraftConfig, only=_AUGMENT_FIELDS, defaults=DISTILL_DEFAULTS)
    method = p.add_argument_group("method")
    method.add_argument("--method", default="auto",
                        help="auto (default): a derived student refined by patient KD where the student fits inside "
                             "the teacher, else the paper's grafting; or any method `graftkd methods` lists (kd, "
                             "fitnet, fskd, ...), run on a fresh student with a grid cell's budget")
    method.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of --method's (repeatable; `graftkd methods` lists them), e.g. "
                             "--method zoo --method-option distiller=pkt")
    method.add_argument("--recipe", default="paper", choices=["paper", "patient"],
                        help="with --method: paper (default) gives the method a grid cell's epochs; patient trains "
                             "it in the shared loop with the patient recipe (mixed views, --samples budget, warm-up "
                             "+ cosine), for the methods `graftkd methods` marks --recipe paper|patient")
    derived = p.add_argument_group("derived students (the default where the student fits inside the teacher)")
    add_options(derived, DeriveOptions)  # how a derived student is built and refined: --init ... --ema
    grafting = p.add_argument_group("grafting (the paper's method; a --method's budget)")
    add_options(grafting, GraftConfig, skip=_AUGMENT_FIELDS + _RUN_FIELDS, defaults=DISTILL_DEFAULTS)
    grafting.add_argument("--replace", type=_int_list,
                          help="partial grafting: replace only these teacher blocks (1-based, e.g. 2,3) by the "
                               "student's")
    run = p.add_argument_group("the run")
    run.add_argument("--out", help="run directory: checkpoint (resumable), student.pt, result.json")
    add_options(run, GraftConfig, only=_RUN_FIELDS, defaults=DISTILL_DEFAULTS)
    run.add_argument("--measure-teacher", action="store_true",
                     help="measure a registered teacher's test accuracy again (default: its registry record, when "
                          "the test data is the one it was measured on)")
    run.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", dest="overrides",
                     help="override any field of the run's settings after the options above (repeatable): "
                          "derive.* (DeriveOptions, e.g. derive.recipe.mix=cutmix, derive.recipe.warmup=0.1) or "
                          "graft.* (GraftConfig, e.g. graft.schedule.block_lr=0.01); checked like a config file's "
                          "values")
    run.add_argument("--config", metavar="FILE",
                     help="a YAML file of this command's options: a list of tokens, as a grid row gives them "
                          "([--init, derived, --samples, \"64000\"]), or a mapping (samples: 64000, repair: true, "
                          "set: [derive.loss=feature_kd]); options on the command line win")
    add_common(run)


def run(args) -> None:
    from graftkd.data import load_dataset, resolve_augment
    from graftkd.data.fewshot import FewShotManifest, make_manifest

    fill_defaults(args, DeriveOptions, skip=("refine", "loss"))  # those two the command resolves below
    # padding and flips stay None unless given: the data's own augmentation decides them (digits: 1, no flips)
    fill_defaults(args, GraftConfig, skip=("padding", "schedule.block_lr", "schedule.net_lr", "schedule.block_epochs",
                                           "schedule.net_epochs", "batch_size"), defaults=DISTILL_DEFAULTS)
    check_out_dir(args.out)
    from graftkd.students import compression_target

    compression_target(args.student_arch)  # a malformed auto:Nx fails before any work
    epochs = [e for given in (args.block_epochs, args.net_epochs) if given is not None
              for e in (given if isinstance(given, list) else [given])]
    if args.block_epochs is not None and args.net_epochs is not None and not any(epochs):
        raise GraftkdError("--block-epochs and --net-epochs are all 0: nothing would be trained; give at least one "
                           "stage some epochs (or --refine none on a derived student for no training)")
    method = None if args.method == "auto" else args.method.strip().lower()
    method_options = _method_options(args.method_option)
    if method_options and method is None:
        raise GraftkdError("--method-option goes with --method NAME (the options are that method's)")
    if args.recipe == "patient" and method is None:
        raise GraftkdError("--recipe patient goes with --method NAME (a derived student always gets the patient "
                           "recipe; set its budget with --samples)")
    if method is not None:
        from graftkd.distill.base import build_method, check_recipe

        runner = build_method(method, method_options)  # an unknown name or option fails here, naming the closest
        if args.recipe == "patient":
            check_recipe(runner)
        if args.init == "derived":
            raise GraftkdError(f"--method {method} runs on a fresh student; for KD or FitNet from a derived "
                               "student use --init derived --refine-loss kd|fitnet (no --method)")
    # grafting's own options mean the user asked for the paper's grafting: honour them instead of ignoring them
    grafting = [flag for flag, given in (
        ("--block-epochs", args.block_epochs is not None), ("--net-epochs", args.net_epochs is not None),
        ("--block-lr", args.block_lr is not None), ("--net-lr", args.net_lr is not None),
        ("--batch-size", args.batch_size is not None), ("--inherit", args.inherit != "auto"),
        ("--inherit-trainable", args.inherit_trainable), ("--mixup", args.mixup)) if given]
    if args.refine is None:  # the resolver decides only what the user left open
        args.refine = "auto" if args.init == "auto" and not args.repair and args.refine_loss is None else "kd"
    args.refine_loss = args.refine_loss or "kd"
    init, reason = args.init, ""
    if method is not None:  # grafting's options are then the method's budget
        init, reason = "fresh", f"--method {method}"
    elif grafting and args.refine != "graft":
        if args.init == "derived":
            raise GraftkdError(f"{', '.join(grafting)} set grafting's schedule, but a derived student is refined by "
                               "patient KD: add --refine graft, or use --init fresh")
        if args.init == "auto":
            init, reason = "fresh", f"grafting options given ({', '.join(grafting)}): the paper's grafting"
    # bad values fail here, before any work
    derive = build_options(args, DeriveOptions, "distill", init=init, reason=reason, refine=args.refine,
                           loss=args.refine_loss)

    # --set: every assignment is checked here, before any work (graft.* against the defaults); graft.* is applied
    # to the run's own GraftConfig once it is built below
    derive = with_overrides({"derive": derive, "graft": GraftConfig()}, args.overrides)["derive"]
    if not (args.fewshot or args.data or args.unlabeled):
        from graftkd.models.teacher_registry import load_registry

        registry = load_registry()
        entry = registry.get(args.teacher) if args.teacher in registry else None
        args.data = (entry.dataset if entry is not None else None) or args.test_data
        if not args.data or args.k is None:
            raise GraftkdError("say where the few-shot images come from: --data SOURCE --k K (K per class), "
                               "--fewshot MANIFEST, or --unlabeled FOLDER")
    manifest = None
    if args.fewshot:
        manifest = FewShotManifest.load(args.fewshot)
        fewshot = manifest.materialize()
    elif args.data:
        if args.k is None:
            raise GraftkdError("--data needs --k (images per class to sample)")
        manifest = make_manifest(args.data, "train", args.k, args.seed, args.subset)
        fewshot = manifest.materialize()
    else:
        fewshot = None  # read once the teacher says how many channels it expects
    labeled_manifest = manifest is not None and manifest.num_classes > 0
    test_source = args.test_data or (manifest.source if labeled_manifest else None)
    test = load_dataset(test_source, "test") if test_source else None
    num_classes = args.num_classes or (test.num_classes if test is not None else None)
    num_classes = num_classes or (manifest.num_classes if labeled_manifest else None)
    teacher = load_teacher(args.teacher, args.teacher_arch, num_classes, args.teachers_dir)
    from graftkd.students import resolve_student

    shape = tuple(getattr(teacher.model, "input_shape", None) or (fewshot.images.shape[1:] if fewshot else (3, 32, 32)))
    args.student_arch, student_reason = resolve_student(args.student_arch, teacher.model, teacher.arch, shape,
                                                        num_outputs(teacher.model, shape))
    if student_reason:
        print(student_reason)
    if fewshot is None:
        from graftkd.data.readers import load_unlabeled_folder

        channels = getattr(teacher.model, "input_shape", (3,))[0]
        fewshot = load_unlabeled_folder(args.unlabeled, grayscale=channels == 1, on_bad_image=args.on_bad_image)
    augment = resolve_augment(getattr(test, "dataset", None) or (manifest.source if manifest else None),
                              args.padding, args.flip)
    config = build_options(args, GraftConfig, "distill", shots=args.k, padding=augment.padding, flip=augment.flip,
                           seed=args.seed)
    config = with_overrides({"derive": derive, "graft": config}, args.overrides)["graft"]
    payload = distill(
        teacher=teacher, student_arch=args.student_arch, fewshot=fewshot, test=test, config=config,
        device=args.device, out=args.out, progress=not args.no_progress,
        manifest=manifest.to_dict() if manifest is not None else None,
        replace=([args.replace] if isinstance(args.replace, int) else args.replace) if args.replace else None,
        derive=derive, measure_teacher=args.measure_teacher, method=method, method_options=method_options,
        method_recipe=derive.recipe if method is not None and args.recipe == "patient" else None,
        student_reason=student_reason,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun the first process reports
    print(summary_table(payload))
    if args.out:
        print(f"student weights: {args.out}/student.pt; result: {args.out}/result.json")


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
                              **input_kwargs(student_arch, fewshot.images.shape[1]))
        kept = [i + 1 for i in range(len(student.blocks())) if i + 1 not in arch_options["replace"]]
        config = with_changes(config, inherit=kept or "none")  # kept blocks: the teacher's, frozen
    else:
        student = build_model(student_arch, num_classes=num_classes,
                              **input_kwargs(student_arch, fewshot.images.shape[1]))
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
                             or (method_recipe is not None and method_recipe.mix != "none"), far=True)
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


AGREEMENT_WARNING = 70.0  # label-free agreement (%) below which a run ends with a warning
# agreement (%) on the far views below which a run ends with a warning: in results/label-free-study, every student
# below it scored under 75 % on validation (fresh ResNet-20s at 50k-800k samples, one derived K=1 ResNet-20 at
# 74 %), and every student above it but one (a fresh ResNet-20 at 3.2M samples, 71.6 %, agreement 40.3) 76 % or more
FAR_AGREEMENT_WARNING = 40.0


def quality_warnings(payload: dict) -> list[str]:
    """What a user without labels should know about a finished run, each with what to try."""
    warnings = []
    free = payload.get("label_free") or {}
    derived = (payload.get("init") or {}).get("used") == "derived"
    advice = ("more images per class or a longer --samples budget" if derived else
              "more images per class, or a student that fits inside the teacher (derived from its weights: "
              "`graftkd students --teacher ...`)")
    if free.get("agreement") is not None and free["agreement"] < AGREEMENT_WARNING:
        warnings.append(f"the label-free agreement is low ({free['agreement']:.1f}% < {AGREEMENT_WARNING:g}%), so "
                        f"expect a test accuracy far below the teacher's; {advice} may help")
    elif (free.get("far") or {}).get("agreement") is not None and free["far"]["agreement"] < FAR_AGREEMENT_WARNING:
        warnings.append(f"the student agrees with the teacher on only {free['far']['agreement']:.1f}% of far views "
                        f"(< {FAR_AGREEMENT_WARNING:g}%: small crops with colour jitter, never trained on), so expect "
                        f"a test accuracy well below the teacher's; {advice} may help")
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
                     f"{free['views']} held-out views of the few-shot images (KL {free['kl']:.3f})"
                     + (f", on {free['far']['agreement']:.1f}% of {free['far']['views']} far views (KL "
                        f"{free['far']['kl']:.3f}; the better guide to accuracy across runs)" if free.get("far") else ""))
    lines += [f"warning: {w}" for w in payload.get("warnings") or []]
    init = payload.get("init")
    if init:
        lines.append(f"start: {init['used']} ({init['why']})")
    few, synth, synth_text = payload["fewshot"], payload.get("synth"), ""
    if synth:
        source = {None: "", "cache": "read from the cache; making them took "}.get(
            synth.get("reused"), f"read from {synth.get('reused')}; making them took ")
        synth_text = (f", plus {synth['made']} synthesised from them and the teacher's BatchNorm statistics "
                      f"({source}{synth['seconds']:.0f} s)")
    lines.append(
        f"few-shot: {few['images']} unlabeled images"
        + (f" ({few['shots']} per class)" if few.get("manifest") else " (from a folder: classes unknown)")
        + synth_text
        + ", wall time "
        f"{payload['wall_seconds']:.1f} s on {payload['device']}"
        + (f" (plus {before:.0f} s of training by the processes before the resume)"
           if (before := (payload.get("resumed") or {}).get("seconds_before")) else "")
    )
    return "\n".join(lines)
