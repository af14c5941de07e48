"""`graftkd evaluate`: the test accuracy of a registered teacher or a weights file, as a traceable record."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from graftkd.engine.evaluate import evaluate_model
from graftkd.engine.runtime import resolve_device, run_facts
from graftkd.errors import GraftkdError
from graftkd.files import atomic_write_json
from graftkd.loaded import load_teacher, normalizer, saved_arch


NAME = "evaluate"
HELP = "test accuracy of a registered teacher or of a weights file"


def add_arguments(p: argparse.ArgumentParser) -> None:
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


def run(args) -> None:
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
