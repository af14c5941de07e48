"""Diagnostic: how much of a derived student's gap is its BatchNorm statistics (validation split, never test).

Trains one dev configuration (``dev.py``'s CONFIGS) into a run folder, then scores the saved student on the
validation split with its BatchNorm statistics as trained (recalibrated on views of the K few-shot images),
re-measured on the K images without augmentation, and re-measured on N *other* unlabeled training images (an
oracle: images the user does not have; it bounds what better statistics could give). Labels of the validation
split are used for scoring only.

    python benchmarks/derived/bn_oracle.py --config r20-fade025-128k-auto --k 1 --seed 0 --out results/cifar10-derived/dev-amx
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--oracle-images", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/cifar10-derived/dev-amx")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from dev import CONFIGS, validation_set

    from graftkd.data import load_dataset
    from graftkd.data.fewshot import make_manifest, validation_indices
    from graftkd.engine.bn import reestimate_batchnorm
    from graftkd.engine.evaluate import evaluate_model
    from graftkd.engine.recipe import Recipe
    from graftkd.engine.runtime import run_facts
    from graftkd.files import atomic_write_json
    from graftkd.graft import GraftConfig
    from graftkd.refine import DeriveOptions
    from graftkd.commands.distill import distill
    from graftkd.loaded import load_model_file, load_teacher, normalizer

    started = time.perf_counter()
    train = load_dataset("cifar10", "train")
    val = validation_set(train)
    keep = validation_indices(train.labels)
    manifest = make_manifest("cifar10", "train", args.k, args.seed, 0)
    fewshot = manifest.materialize()
    used = set(keep) | set(manifest.indices or ())
    others = [i for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(7)).tolist()
              if i not in used][: args.oracle_images]
    teacher_name, student_arch, derive_over, recipe_over, *rest = CONFIGS[args.config]
    options = DeriveOptions(**derive_over, recipe=replace(Recipe(), **recipe_over))
    with tempfile.TemporaryDirectory() as tmp:
        payload = distill(teacher=load_teacher(teacher_name, None, 10, None), student_arch=student_arch,
                          fewshot=fewshot, test=val, config=GraftConfig(shots=args.k, seed=args.seed,
                                                                        **{"precision": "fp32", **(rest[0] if rest else {})}),
                          device="cpu", out=tmp, progress=False, manifest=manifest.to_dict(), derive=options)
        loaded = load_model_file(student_arch, Path(tmp) / "student.pt", 10)
    norm = normalizer(loaded.mean, loaded.std)
    student, device = loaded.model.eval(), torch.device("cpu")

    def score() -> float:
        return evaluate_model(student, val.images, val.labels, norm, device, progress=False)

    def batches(images: torch.Tensor):
        for i in range(0, len(images), 250):
            yield norm(images[i:i + 250]).float()

    scores = {"as trained (recalibrated on views of the K images)": score()}
    reestimate_batchnorm(student, batches(fewshot.images))
    scores["re-measured on the K images, no augmentation"] = score()
    reestimate_batchnorm(student, batches(train.images[torch.tensor(others)]))
    scores[f"oracle: re-measured on {len(others)} other unlabeled training images"] = score()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"command": " ".join(["python"] + sys.argv), "commit": commit, "config": args.config, "k": args.k,
              "seed": args.seed, "threads": torch.get_num_threads(), "device": run_facts(device)["device"],
              "evaluated_on": "validation (1,000 training images, never test)", "val_acc_run": payload["student"]["test_acc"],
              "scores": scores, "wall_seconds": time.perf_counter() - started}
    path = Path(args.out) / f"bn-oracle-{args.config}-k{args.k}-s{args.seed}.json"
    atomic_write_json(path, record)
    for what, acc in scores.items():
        print(f"{acc:6.2f}  {what}")


if __name__ == "__main__":
    main()
