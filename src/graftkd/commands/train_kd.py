"""`graftkd train-kd`: full-data CE + KD (+ a feature distiller), one process or many under torchrun."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from graftkd.commands.common import add_common, add_teacher, check_out_dir, input_kwargs
from graftkd.distill.fulldata import KDRecipe
from graftkd.engine.runtime import resolve_device, run_facts
from graftkd.errors import GraftkdError
from graftkd.files import atomic_write_json
from graftkd.loaded import LoadedModel, load_teacher, model_costs, normalizer, save_model
from graftkd.models import build_model
from graftkd.schema import add_options, build_options


NAME = "train-kd"
HELP = "full-data distillation: CE + KD (+ a feature distiller); torchrun for many processes"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student-arch", required=True, help="zoo architecture of the student, e.g. resnet8x4")
    add_teacher(p, required=False, help="a registered teacher name or a weights file (not needed for --kd-weight 0 "
                                       "--distiller none)")
    p.add_argument("--data", required=True, help="labeled data: cifar100, cifar10, digits, a folder or archive")
    add_options(p, KDRecipe)
    p.add_argument("--limit-train", type=int, help="use a fixed random subset of N training images (smoke runs)")
    p.add_argument("--out", help="run directory: checkpoint (resumable), student.pt, result.json")
    add_common(p)


def run(args) -> None:
    check_out_dir(args.out)

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
    student = build_model(student_arch, num_classes=train.num_classes, **input_kwargs(student_arch, images.shape[1]))
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
