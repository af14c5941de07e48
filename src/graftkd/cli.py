"""graftkd command line: parse, validate, call one workflow function per command."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from graftkd.errors import GraftkdError, Interrupted


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


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the run (few-shot draw, initialisation, batches)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


# where `graftkd distill` differs from the library's GraftConfig: a user's run compiles where it pays (the library
# and the grids stay eager, as the committed cells ran)
DISTILL_DEFAULTS = {"compile": "auto"}


def build_parser() -> argparse.ArgumentParser:
    # options that set a config field are declared once, on the field (schema.option): name, type, choices, help
    from graftkd.distill.fulldata import KDRecipe
    from graftkd.engine.supervised import TeacherRecipe
    from graftkd.graft import GraftConfig
    from graftkd.refine import DeriveOptions
    from graftkd.schema import add_options

    parser = argparse.ArgumentParser(prog="graftkd", description="Few-shot distillation by network grafting.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="graft a digits CNN from 1 and 5 unlabeled images per class (no download)")
    p.add_argument("--out", default="runs/demo", help="folder for the demo's runs and its summary (default: runs/demo)")
    _add_common(p)

    p = sub.add_parser("fewshot", help="write a few-shot manifest: K images per class, labels dropped")
    p.add_argument("--data", required=True, help="digits, cifar10, cifar100, a .tar.gz or an image folder")
    p.add_argument("--split", default="train", help="which split to draw from (default: train)")
    p.add_argument("--k", type=int, required=True, help="images per class")
    p.add_argument("--subset", type=int, default=0, help="which of several disjoint subsets (0, 1, ...)")
    p.add_argument("--out", required=True, help="manifest JSON path")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw: the same seed and subset give the same images")

    p = sub.add_parser("train-teacher", help="supervised training of a zoo model (resumable)")
    p.add_argument("--arch", required=True, help="zoo architecture to train (`graftkd models`), e.g. resnet56")
    p.add_argument("--data", required=True, help="labeled data: digits, cifar10, cifar100, a .tar.gz or an image folder")
    p.add_argument("--out", required=True, help="run directory (checkpoint, model.pt, result.json)")
    add_options(p, TeacherRecipe)
    p.add_argument("--checkpoint-every-s", type=float, default=300.0,
                   help="also checkpoint inside an epoch this often (seconds; 0 = every step)")
    _add_common(p)

    p = sub.add_parser("distill", help="graft a student into a teacher from a few unlabeled images")
    p.add_argument("--teacher", required=True,
                   help="a registered teacher name (`graftkd teachers list`) or a weights file")
    p.add_argument("--teacher-arch", help="zoo architecture of a teacher weights file, e.g. resnet56")
    p.add_argument("--teachers-dir", help="folder holding registered teacher files (also: GRAFTKD_TEACHERS)")
    p.add_argument("--student-arch", required=True,
                   help="zoo architecture of the student (e.g. resnet20), or auto[:Nx]: the zoo student closest to N "
                        "times fewer parameters (3 by default) that can be derived from the teacher "
                        "(`graftkd students --teacher NAME` lists them)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--fewshot", help="few-shot manifest written by `graftkd fewshot`")
    src.add_argument("--data", help="labeled source to sample K per class from (labels are then dropped); "
                                    "default with --k: the registered teacher's dataset, else --test-data")
    src.add_argument("--unlabeled", help="a folder of unlabeled images: the few-shot set as is")
    p.add_argument("--k", type=int, help="images per class (with --data)")
    p.add_argument("--subset", type=int, default=0,
                   help="with --data: which of several disjoint K-per-class subsets to draw (0, 1, ...)")
    p.add_argument("--test-data", help="labeled data whose 'test' split is used for reporting only")
    p.add_argument("--num-classes", type=int, help="classes the teacher predicts (default: from the data)")
    add_options(p, GraftConfig, defaults=DISTILL_DEFAULTS)  # grafting's settings: --preset ... --checkpoint-every-s
    p.add_argument("--on-bad-image", default="error", choices=["error", "skip"],
                   help="an unreadable image in --unlabeled: stop with its name (error, the default) or leave it out")
    p.add_argument("--out", help="run directory: checkpoint (resumable), student.pt, result.json")
    p.add_argument("--method", default="auto",
                   help="auto (default): a derived student refined by patient KD where the student fits inside the "
                        "teacher, else the paper's grafting; or any method `graftkd methods` lists (kd, fitnet, "
                        "fskd, ...), run on a fresh student with a grid cell's budget")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of --method's (repeatable; `graftkd methods` lists them), e.g. "
                        "--method zoo --method-option distiller=pkt")
    p.add_argument("--recipe", default="paper", choices=["paper", "patient"],
                   help="with --method: paper (default) gives the method a grid cell's epochs; patient trains it "
                        "in the shared loop with the patient recipe (mixed views, --samples budget, warm-up + "
                        "cosine), for kd, fitnet, whole and feature_kd")
    add_options(p, DeriveOptions)  # how a derived student is built and refined: --init ... --ema
    p.add_argument("--measure-teacher", action="store_true",
                   help="measure a registered teacher's test accuracy again (default: its registry record, when the "
                        "test data is the one it was measured on)")
    p.add_argument("--replace", type=_int_list,
                   help="partial grafting: replace only these teacher blocks (1-based, e.g. 2,3) by the student's")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", dest="overrides",
                   help="override any field of the run's settings after the options above (repeatable): "
                        "derive.* (DeriveOptions, e.g. derive.recipe.mix=cutmix, derive.recipe.warmup=0.1) or graft.* "
                        "(GraftConfig, e.g. graft.schedule.block_lr=0.01); checked like a config file's values")
    p.add_argument("--config", metavar="FILE",
                   help="a YAML file of this command's options: a list of tokens, as a grid row gives them "
                        "([--init, derived, --samples, \"64000\"]), or a mapping (samples: 64000, repair: true, "
                        "set: [derive.loss=feature_kd]); options on the command line win")
    _add_common(p)

    p = sub.add_parser("train-kd", help="full-data distillation: CE + KD (+ a feature distiller); torchrun for many processes")
    p.add_argument("--student-arch", required=True, help="zoo architecture of the student, e.g. resnet8x4")
    p.add_argument("--teacher", help="registered teacher name or weights file (not needed for --kd-weight 0 --distiller none)")
    p.add_argument("--teacher-arch", help="zoo architecture of a teacher weights file")
    p.add_argument("--teachers-dir", help="folder holding registered teacher files (also: GRAFTKD_TEACHERS)")
    p.add_argument("--data", required=True, help="labeled data: cifar100, cifar10, digits, a folder or archive")
    add_options(p, KDRecipe)
    p.add_argument("--limit-train", type=int, help="use a fixed random subset of N training images (smoke runs)")
    p.add_argument("--out", help="run directory: checkpoint (resumable), student.pt, result.json")
    _add_common(p)

    p = sub.add_parser("export", help="write a trained model as state_dict + config, torch.export and ONNX, with a model card")
    p.add_argument("--weights", required=True, help="a graftkd student.pt / model.pt")
    p.add_argument("--out", required=True, help="folder for the exported files and MODEL_CARD.md")
    p.add_argument("--formats", default="state_dict,safetensors,torch_export,onnx",
                   help="comma-separated subset of: state_dict, safetensors, torch_export, onnx")
    p.add_argument("--result", help="the run's result.json (default: beside --weights) for the model card")

    p = sub.add_parser("students", help="list the zoo students that fit a teacher, and whether they can be derived")
    p.add_argument("--teacher", required=True, help="a registered teacher name or a weights file")
    p.add_argument("--teacher-arch", help="architecture of a teacher weights file")
    p.add_argument("--teachers-dir", help="folder with the registered teachers' files")
    p.add_argument("--num-classes", type=int, help="classes of a teacher weights file")

    p = sub.add_parser("models", help="list the zoo with parameters, FLOPs and blocks")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the models' heads, for parameters and FLOPs (default: 10)")

    p = sub.add_parser("evaluate", help="test accuracy of a registered teacher or of a weights file")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--teacher", help="registered teacher name; compared with the registry's accuracy")
    which.add_argument("--weights", help="weights file (a graftkd student.pt names its architecture; others need --arch)")
    p.add_argument("--arch", help="zoo architecture of --weights")
    p.add_argument("--data", help="labeled data (default for --teacher: its registered dataset)")
    p.add_argument("--split", default="test", help="which split to score (default: test)")
    p.add_argument("--teachers-dir", help="folder holding registered teacher files (also: GRAFTKD_TEACHERS)")
    p.add_argument("--tolerance", type=float, default=0.1,
                   help="fail when a teacher's accuracy differs from the registry by more (points)")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default: 500)")
    p.add_argument("--out", help="write the measurement (with command, commit, device, time) to this JSON")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = sub.add_parser("bench", help="run (or finish) an experiment grid: methods x shots x seeds x subsets")
    p.add_argument("--config", required=True, help="grid YAML, e.g. configs/digits.yaml")
    p.add_argument("--out", default="results", help="results root: cells go to <out>/<grid name>/cells/")
    p.add_argument("--runs", default="runs/bench", help="checkpoints of unfinished cells (resumable)")
    p.add_argument("--methods", help="comma-separated subset of the grid's methods to run now")
    p.add_argument("--shots", help="comma-separated subset of the grid's K values to run now")
    p.add_argument("--seeds", help="comma-separated subset of the grid's seeds to run now")
    p.add_argument("--curves-only", action="store_true",
                   help="run only the grid's Figure 3 curve cells (train/test accuracy every curves.eval_every epochs)")
    p.add_argument("--no-report", action="store_true", help="do not regenerate results.md/json and plots")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells to run at once, each in its own process with the grid's thread count (default 1)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = sub.add_parser("report", help="tables (Markdown, JSON) and plots from a grid's result files or a folder of distill runs")
    p.add_argument("results_dir", help="results/<grid name>, or any folder of `graftkd distill` runs")

    p = sub.add_parser("methods", help="list the few-shot methods and their options")

    p = sub.add_parser("teachers", help="the teacher registry")
    tsub = p.add_subparsers(dest="teachers_command", required=True)
    q = tsub.add_parser("list", help="registered teachers, their accuracy and whether their file is here")
    q.add_argument("--teachers-dir", help="folder holding teacher files (also: GRAFTKD_TEACHERS)")
    return parser


def _cmd_demo(args) -> None:
    from graftkd.demo import run_demo

    run_demo(args.out, device=args.device, seed=args.seed, progress=not args.no_progress)


def _cmd_fewshot(args) -> None:
    from graftkd.workflows import build_fewshot

    manifest = build_fewshot(args.data, args.k, args.seed, args.subset, args.split, args.out)
    print(f"wrote {args.out}: {manifest.k} per class x {manifest.num_classes} classes from {manifest.source}")


def _cmd_train_teacher(args) -> None:
    _check_out_dir(args.out)
    from graftkd.engine.supervised import TeacherRecipe
    from graftkd.schema import build_options
    from graftkd.workflows import train_teacher

    recipe = build_options(args, TeacherRecipe, "train-teacher", seed=args.seed)
    result = train_teacher(args.arch, args.data, args.out, recipe, args.device, not args.no_progress,
                           checkpoint_every_s=args.checkpoint_every_s)
    print(f"{args.arch} on {args.data}: {result['test_acc']:.2f}% test accuracy in {result['wall_seconds']:.0f} s; "
          f"weights in {args.out}/model.pt")


def _check_out_dir(out: str | None) -> None:
    """Refuse an ``--out`` that cannot become a directory before any work starts (not at the first save)."""
    if not out:
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise GraftkdError(f"--out {out} is a file, not a directory: choose another --out")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise GraftkdError(f"--out {out} is below {parent}, which is a file: choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GraftkdError(f"--out {out}: {parent} is not writable: choose another --out")


def _cmd_distill(args) -> None:
    from graftkd.data import load_dataset, resolve_augment
    from graftkd.data.fewshot import FewShotManifest, make_manifest
    from graftkd.graft import GraftConfig
    from graftkd.workflows import distill, load_teacher, summary_table

    from graftkd.schema import build_options, fill_defaults, with_overrides
    from graftkd.workflows import DeriveOptions

    fill_defaults(args, DeriveOptions, skip=("refine", "loss"))  # those two the command resolves below
    # padding and flips stay None unless given: the data's own augmentation decides them (digits: 1, no flips)
    fill_defaults(args, GraftConfig, skip=("padding", "schedule.block_lr", "schedule.net_lr", "schedule.block_epochs",
                                           "schedule.net_epochs", "batch_size"), defaults=DISTILL_DEFAULTS)
    _check_out_dir(args.out)
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
        from graftkd.distill.base import build_method

        build_method(method, method_options)  # an unknown name or option fails here, naming the closest ones
        if args.recipe == "patient" and method in ("graft", "fskd", "cross", "graft_fskd"):
            raise GraftkdError(f"--recipe patient needs a method that trains in the shared loop (kd, fitnet, "
                               f"whole, feature_kd); '{method}' has its own schedule: use --recipe paper")
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
    from graftkd.loaded import num_outputs

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


def _cmd_train_kd(args) -> None:
    _check_out_dir(args.out)
    from graftkd.distill.fulldata import KDRecipe
    from graftkd.schema import build_options
    from graftkd.workflows import distill_full

    distiller = None if (args.distiller or "none").lower() in ("none", "") else args.distiller
    if distiller:
        from graftkd.distill.zoo import distiller_class

        distiller_class(distiller)  # an unknown name fails here, before any data is read
    recipe = build_options(args, KDRecipe, "train-kd", seed=args.seed, distiller=distiller)
    payload = distill_full(args.student_arch, args.data, args.out, recipe, teacher=args.teacher,
                           teacher_arch=args.teacher_arch, teachers_dir=args.teachers_dir, device=args.device,
                           progress=not args.no_progress, limit_train=args.limit_train)
    if payload["world_size"] > 1 and int(os.environ.get("RANK", "0")) != 0:
        return
    last, best = payload["last_epoch_test_acc"], payload["best_epoch"]
    method = "+".join(["ce"] + (["kd"] if recipe.kd_weight else []) + ([payload["distiller"]] if payload["distiller"] else []))
    print(f"{args.student_arch} ({method}): last epoch "
          f"{last:.2f}% test" + (f"; best epoch {best['epoch']}: {best['test_acc']:.2f}% (selected on test)" if best else "")
          + f"; {payload['world_size']} process(es), {payload['seconds']:.0f} s")
    if args.out:
        print(f"student weights: {args.out}/student.pt; result: {args.out}/result.json")


def _cmd_export(args) -> None:
    from graftkd.engine.runtime import run_facts, resolve_device
    from graftkd.export import export_model

    result = args.result or str(Path(args.weights).with_name("result.json"))
    report = export_model(args.weights, args.out, tuple(f.strip() for f in args.formats.split(",") if f.strip()),
                          result=result, command=run_facts(resolve_device("cpu"))["command"])
    for name, entry in report["formats"].items():
        detail = f"max |diff| {entry['max_abs_diff']:.2e}" if "max_abs_diff" in entry else entry.get("reason", "")
        print(f"{name:<13} {entry['status']}  {detail}")
    print(f"model card: {report['card']}")


def _cmd_evaluate(args) -> None:
    from graftkd.workflows import evaluate_weights, saved_arch

    if args.weights and not args.arch:
        args.arch = saved_arch(args.weights) if Path(args.weights).is_file() else None
        if not args.arch:
            raise GraftkdError(f"--weights {args.weights} does not name its architecture (not a graftkd student.pt): "
                               "add --arch (the zoo architecture of the file, e.g. resnet56)")
    payload = evaluate_weights(
        teacher=args.teacher, weights=args.weights, arch=args.arch, data=args.data, split=args.split,
        teachers_dir=args.teachers_dir, device=args.device, batch_size=args.batch_size, out=args.out,
        progress=not args.no_progress,
    )
    print(f"{payload['model']} on {payload['data']} ({payload['split']}): {payload['accuracy']:.2f}% top-1 over "
          f"{payload['images']} images in {payload['wall_seconds']:.1f} s")
    expected = payload.get("registry_accuracy")
    if expected is not None:
        delta = payload["accuracy"] - expected
        verdict = "matches" if abs(delta) <= args.tolerance else "DIFFERS FROM"
        print(f"{verdict} the registry's {expected:.2f}% (delta {delta:+.2f}, tolerance {args.tolerance})")
        if abs(delta) > args.tolerance:
            raise GraftkdError(f"teacher '{args.teacher}' measured {payload['accuracy']:.2f}% but the registry says "
                               f"{expected:.2f}%: check the data ({payload['data']}) and the file")
    if args.out:
        print(f"wrote {args.out}")


def _cmd_bench(args) -> None:
    from graftkd.bench import run_grid

    only = [m.strip() for m in args.methods.split(",")] if args.methods else None
    shots = [int(k) for k in args.shots.split(",")] if args.shots else None
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    summary = run_grid(args.config, args.out, args.runs, args.device, not args.no_progress, only, shots, seeds,
                       args.curves_only, args.jobs)
    print(f"{summary['cells']} cells: {summary['ok']} ran, {summary['skipped']} already done, "
          f"{summary['unsupported']} unsupported, {summary['failed']} failed; results in {summary['out']}")
    if not args.no_report:
        from graftkd.report import write_any_report

        print(f"report: {write_any_report(summary['out'])['markdown']}")
    if summary["failed"]:
        raise GraftkdError(f"{summary['failed']} cell(s) failed (see their result files); re-run to retry them")


def _cmd_report(args) -> None:
    from graftkd.report import write_any_report

    written = write_any_report(args.results_dir)
    print(f"wrote {written['markdown']}, {written['json']}" + "".join(f", {p}" for p in written["plots"] if p))


def _first_sentence(doc: str | None) -> str:
    """A docstring's whole first paragraph on one line (a line break is not the end of a sentence)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def _cmd_methods(args) -> None:
    from graftkd.distill.base import METHODS, list_methods

    width = max(map(len, list_methods()), default=0)
    for name in list_methods():
        cls = METHODS[name]
        options = ", ".join(f"{k}={v!r}" for k, v in cls.defaults.items()) or "no options"
        print(f"{name:<{width}} {_first_sentence(cls.__doc__ or sys.modules[cls.__module__].__doc__)}  [{options}]")
    from graftkd.distill.zoo import DISTILLERS, list_distillers

    print("\nfeature distillers for full-data training (graftkd train-kd --distiller NAME [--adaptive sakd]):")
    for name in list_distillers():
        cls = DISTILLERS[name]
        summary = _first_sentence(sys.modules[cls.__module__].__doc__)
        print(f"{name:<8} spots={cls.spot_kind:<9} beta={cls.weight:<8g} {summary}")


def _cmd_teachers(args) -> None:
    from graftkd.models.teacher_registry import load_registry, teacher_dirs
    from graftkd.workflows import teacher_status

    registry = load_registry()
    print(f"{'name':<18} {'arch':<10} {'data':<9} {'acc %':>6} {'ref %':>6}  file")
    for entry in registry:
        acc = f"{entry.accuracy:.2f}" if entry.accuracy is not None else "-"
        ref = f"{entry.reference_accuracy:.2f}" if entry.reference_accuracy is not None else "-"
        print(f"{entry.name:<18} {entry.arch:<10} {entry.dataset:<9} {acc:>6} {ref:>6}  "
              f"{entry.file} [{teacher_status(entry, args.teachers_dir)}]")
    print("searched: " + ", ".join(str(d) for d in teacher_dirs(args.teachers_dir)))


def _cmd_models(args) -> None:
    from graftkd.models import build_model, list_models
    from graftkd.models.profile import count_flops, count_params, format_count

    print(f"{'model':<16} {'input':<9} {'params':>8} {'FLOPs':>8}  blocks")
    for name in list_models():
        if name == "hybrid":  # built from a teacher, a student and --replace, not on its own
            continue
        model = build_model(name, num_classes=args.num_classes)
        shape = tuple(getattr(model, "input_shape", (3, 32, 32)))
        flops = count_flops(model, shape)  # torch.utils.flop_counter: a multiply-add counts 2
        size = "x".join(map(str, shape))
        print(f"{name:<16} {size:<9} {format_count(count_params(model)):>8} {format_count(flops):>8}  "
              f"{', '.join(model.block_names())}")


def _cmd_students(args) -> None:
    from graftkd.models.profile import format_count
    from graftkd.students import fitting_students
    from graftkd.workflows import load_teacher

    teacher = load_teacher(args.teacher, args.teacher_arch, args.num_classes, args.teachers_dir)
    shape = tuple(getattr(teacher.model, "input_shape", (3, 32, 32)))
    from graftkd.loaded import num_outputs

    fits = fitting_students(teacher.model, teacher.arch, shape, num_outputs(teacher.model, shape))
    print(f"students that fit {teacher.source} ({teacher.arch}), smallest first:")
    print(f"{'model':<16} {'params':>8} {'FLOPs':>8} {'smaller':>8}  derivable from the teacher")
    for f in fits:
        why = f" ({f.why})" if f.derivable == "no" and f.why else ""
        print(f"{f.arch:<16} {format_count(f.params):>8} {format_count(f.flops):>8} {f.compression:>7.1f}x  "
              f"{f.derivable}{why}")
    if not fits:
        print("none: name a student with --student-arch (`graftkd models` lists the zoo)")


COMMANDS = {
    "students": _cmd_students,
    "models": _cmd_models,
    "demo": _cmd_demo,
    "fewshot": _cmd_fewshot,
    "train-teacher": _cmd_train_teacher,
    "distill": _cmd_distill,
    "train-kd": _cmd_train_kd,
    "export": _cmd_export,
    "evaluate": _cmd_evaluate,
    "teachers": _cmd_teachers,
    "bench": _cmd_bench,
    "report": _cmd_report,
    "methods": _cmd_methods,
}


def config_tokens(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """A ``--config`` file's options as command-line tokens: a YAML list of tokens (a grid row), or a mapping of
    option names to values (``true``: a switch; a list: several values, or a repeated option for ``set`` and
    ``method-option``). Every name is checked against the command's options before any work."""
    import difflib

    import yaml

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise GraftkdError(f"--config {path}: cannot read it ({exc.__class__.__name__}: "
                           f"{getattr(exc, 'strerror', None) or exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GraftkdError(f"--config {path}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    known = {s for action in parser._actions for s in action.option_strings}
    repeated = {s for action in parser._actions if isinstance(action, argparse._AppendAction) for s in action.option_strings}
    if raw is None:
        return []
    if isinstance(raw, list):
        tokens = [str(t) for t in raw]
    elif isinstance(raw, dict):
        tokens = []
        for key, value in raw.items():
            flag = "--" + str(key).lstrip("-").replace("_", "-")
            if flag not in known:
                close = difflib.get_close_matches(flag, sorted(known), n=1)
                hint = f" (did you mean '{close[0].lstrip('-')}'?)" if close else ""
                raise GraftkdError(f"--config {path}: unknown option '{key}'{hint}; `graftkd distill --help` lists them")
            if value is True:
                tokens.append(flag)
            elif value is False or value is None:
                continue
            elif isinstance(value, list) and flag in repeated:
                for item in value:
                    tokens += [flag, str(item)]
            elif isinstance(value, list):
                tokens += [flag, ",".join(str(v) for v in value)]
            else:
                tokens += [flag, str(value)]
    else:
        raise GraftkdError(f"--config {path}: must be a list of option tokens or a mapping of options to values")
    for token in tokens:
        name = token.split("=", 1)[0]
        if token.startswith("--") and name not in known:
            raise GraftkdError(f"--config {path}: unknown option '{name}'; `graftkd distill --help` lists them")
        if name == "--config":
            raise GraftkdError(f"--config {path}: a config file cannot name another --config")
    return tokens


def _expand_config(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Put a ``distill --config FILE``'s tokens right after the command, so options given on the command line
    (parsed later) win over the file's."""
    if not argv or argv[0] != "distill":
        return argv
    rest, path = [], None
    i = 1
    while i < len(argv):
        token = argv[i]
        if token == "--config" and i + 1 < len(argv):
            path, i = argv[i + 1], i + 2
            continue
        if token.startswith("--config="):
            path = token.split("=", 1)[1]
        else:
            rest.append(token)
        i += 1
    if path is None:
        return argv
    distill_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["distill"]
    return ["distill", *config_tokens(path, distill_parser), *rest]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        argv = _expand_config(argv, parser)
    except GraftkdError as exc:
        print(f"graftkd: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except Interrupted as exc:  # the state is saved: not a failure
        print(f"graftkd: interrupted — {exc}", file=sys.stderr)
        return 130
    except GraftkdError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"graftkd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graftkd: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            traceback.print_exc()
        detail = " ".join(str(exc).split())[:300]
        print(f"graftkd: internal error: {type(exc).__name__}: {detail} (a bug in graftkd: re-run with --debug "
              "and report the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
