"""`graftkd train-teacher`: supervised training of a zoo model, resumable."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from graftkd.commands.common import add_common, check_out_dir, input_kwargs
from graftkd.engine.checkpoint import Checkpointer, fingerprint
from graftkd.engine.runtime import resolve_device, run_facts, seed_everything
from graftkd.engine.supervised import TeacherRecipe, train_supervised
from graftkd.errors import GraftkdError
from graftkd.files import atomic_write_json
from graftkd.loaded import LoadedModel, model_costs, normalizer, save_model
from graftkd.models import build_model
from graftkd.schema import add_options, build_options


NAME = "train-teacher"
HELP = "supervised training of a zoo model (resumable)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", required=True, help="zoo architecture to train (`graftkd models`), e.g. resnet56")
    p.add_argument("--data", required=True, help="labeled data: digits, cifar10, cifar100, a .tar.gz or an image folder")
    p.add_argument("--out", required=True, help="run directory (checkpoint, model.pt, result.json)")
    add_options(p, TeacherRecipe)
    p.add_argument("--checkpoint-every-s", type=float, default=300.0,
                   help="also checkpoint inside an epoch this often (seconds; 0 = every step)")
    add_common(p)


def run(args) -> None:
    check_out_dir(args.out)

    recipe = build_options(args, TeacherRecipe, "train-teacher", seed=args.seed)
    result = train_teacher(args.arch, args.data, args.out, recipe, args.device, not args.no_progress,
                           checkpoint_every_s=args.checkpoint_every_s)
    print(f"{args.arch} on {args.data}: {result['test_acc']:.2f}% test accuracy in {result['wall_seconds']:.0f} s; "
          f"weights in {args.out}/model.pt")


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
    model = build_model(arch, num_classes=train.num_classes, **input_kwargs(arch, train.images.shape[1]))
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
