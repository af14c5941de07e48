"""Which label-free estimate tracks a student's accuracy? Every committed CIFAR-10 cell whose student is still on disk.

    GRAFTKD_DATA=../shared/data GRAFTKD_TEACHERS=../shared/teachers \
        python benchmarks/label_free_study.py [--out results/label-free-study] [--threads 2] [--limit N]

`distill` records top-1 agreement and KL between student and teacher on a held-out pool of crop-and-flip views of
the few-shot images plus as many mixed views (`graftkd.engine.agreement`). Within one K it ranks students well,
across K it does not: a fresh K=1 student agrees with its teacher on views of its 10 images as well as a K=10
student does, and scores half as much on test. This script re-scores every committed cell's student (the
`student.pt` its command wrote under `runs/`; a cell whose file is gone or holds other weights is skipped, said so)
on several pools drawn from the same few-shot images, none of them used in training:

- standard: the recorded estimate, recomputed (a check that the file is the cell's student);
- clean / mixed: its two halves, the crop-and-flip views and the mixup blends;
- strong: random-resized crops of 10-50 % of the area, flipped, with colour jitter 0.4: views farther from the
  training distribution than any the recipe trains on (32 per image);
- noise: crop-and-flip views plus Gaussian noise (sigma 0.05 on [0, 1] pixels; 32 per image).

Each pool is scored by agreement (%), KL(teacher || student), and the agreement on the views where the teacher gives
its top class at least 0.8 probability (views a student has a fair chance to get right). The development measure is each student's accuracy
on the fixed labeled validation split (1,000 CIFAR-10 training images that no few-shot subset uses,
`benchmarks/derived/dev.py`); the test accuracy the cell recorded is shown beside it and chooses nothing. Writes
`<out>/study.json` (every cell, every estimate) and `<out>/README.md` (Spearman rank correlations per pair, over
all its cells and within each K).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "derived"))
from grid import _spearman as spearman  # noqa: E402  (the grids' own rank correlation)

GRIDS = ("results/cifar10-derived/cells", "results/cifar10-patient/cells")
POOLS = ("standard", "clean", "mixed", "strong", "noise")
CONFIDENT = 0.8  # a view counts as confident when the teacher gives its top class at least this probability
SEED = 1_000_003  # the recorded pool's seed (graftkd.engine.agreement.POOL_SEED); the other pools offset it


def pools(images: torch.Tensor, norm, views: int = 8, extra: int = 32) -> dict[str, torch.Tensor]:
    """Every pool of the study for one cell's few-shot images (uint8, N x C x H x W)."""
    from graftkd.data.augment import Augment
    from graftkd.engine.agreement import agreement_pool, far_pool

    standard = agreement_pool(images, norm, Augment(4, True), views=views, mixed=True, seed=SEED)
    half = len(standard) // 2
    strong = far_pool(images, norm, views=extra, seed=SEED + 1)  # what `distill` now records as label_free.far
    generator = torch.Generator().manual_seed(SEED + 2)
    crop = Augment(4, True)
    noisy = []
    for _ in range(extra):
        x = crop(images, generator).float() / 255.0
        noisy.append(norm((x + 0.05 * torch.randn(x.shape, generator=generator)).clamp(0, 1)).float())
    return {"standard": standard, "clean": standard[:half], "mixed": standard[half:], "strong": strong,
            "noise": torch.cat(noisy)}


@torch.no_grad()
def score(student, teacher, pool: torch.Tensor, batch_size: int = 500) -> dict:
    """Agreement (%) and KL(teacher || student) as `graftkd.engine.agreement.agreement` computes them, plus the
    agreement on the views where the teacher is confident (top probability >= CONFIDENT) and their share."""
    import torch.nn.functional as F

    t = torch.cat([teacher(pool[i:i + batch_size]).float() for i in range(0, len(pool), batch_size)])
    s = torch.cat([student(pool[i:i + batch_size]).float() for i in range(0, len(pool), batch_size)])
    same = s.argmax(1) == t.argmax(1)
    kl = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="sum") / len(pool)
    confident = F.softmax(t, 1).amax(1) >= CONFIDENT
    return {"agreement": 100.0 * float(same.float().mean()), "kl": float(kl), "views": len(pool),
            "confident_agreement": 100.0 * float(same[confident].float().mean()) if confident.any() else None,
            "confident_share": 100.0 * float(confident.float().mean())}


def cells(limit: int | None) -> list[tuple[Path, dict, Path]]:
    """(cell file, cell record, student.pt) for every committed cell whose command's --out still holds a student."""
    found = []
    for grid in GRIDS:
        for path in sorted((ROOT / grid).glob("*/*/k*-s*.json")):
            record = json.loads(path.read_text())
            argv = shlex.split(record["command"])
            if "--out" not in argv:
                continue
            weights = ROOT / argv[argv.index("--out") + 1] / "student.pt"
            found.append((path, record, weights))
    return found[:limit] if limit else found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/label-free-study")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="only the first N cells (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from dev import validation_set

    from graftkd.data import load_dataset
    from graftkd.data.fewshot import FewShotManifest
    from graftkd.files import atomic_write_json, atomic_write_text
    from graftkd.loaded import load_teacher, normalizer
    from graftkd.engine.runtime import run_facts

    started = time.perf_counter()
    val = validation_set(load_dataset("cifar10", "train"))
    teachers, rows, skipped = {}, [], []
    for path, record, weights in cells(args.limit):
        name = str(path.relative_to(ROOT))
        if not weights.is_file():
            skipped.append(f"{name}: no student file ({weights.relative_to(ROOT)})")
            continue
        saved = torch.load(weights, map_location="cpu", weights_only=True)
        recorded = record["student"]["test_acc"]
        if abs(float(saved.get("test_acc", -1)) - recorded) > 0.005:
            skipped.append(f"{name}: {weights.relative_to(ROOT)} holds other weights (test {saved.get('test_acc')} "
                           f"against the cell's {recorded:.2f})")
            continue
        teacher_name = record["teacher"]["source"].split(" ")[0]  # "resnet56-cifar10 (/path/to/weights)"
        if teacher_name not in teachers:
            teachers[teacher_name] = load_teacher(teacher_name, None, 10, None)
        teacher = teachers[teacher_name]
        student = load_teacher(str(weights), None, 10, None)
        norm = normalizer(teacher.mean, teacher.std)
        images = FewShotManifest.from_dict(record["fewshot"]["manifest"]).materialize().images
        scores = {name: score(student.model.eval(), teacher.model.eval(), pool)
                  for name, pool in pools(images, norm).items()}
        with torch.no_grad():
            student_norm = normalizer(student.mean, student.std)
            logits = torch.cat([student.model(student_norm(val.images[i:i + 500])).float()
                                for i in range(0, len(val), 500)])
        val_acc = 100.0 * float((logits.argmax(1) == val.labels).float().mean())
        recorded_free = record.get("label_free") or {}
        rows.append({"cell": name, "pair": record["pair"], "row": record["row"],
                     "k": record["fewshot"]["shots"], "seed": record["seed"],
                     "init": (record.get("init") or {}).get("used") or record.get("method"),
                     "test_acc": recorded, "val_acc": val_acc, "recorded_agreement": recorded_free.get("agreement"),
                     "scores": scores})
        print(f"{name}: test {recorded:.2f} val {val_acc:.2f} | " + " ".join(
            f"{p} {s['agreement']:.1f}" for p, s in scores.items()), flush=True)
    facts = run_facts(torch.device("cpu"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    summary = correlations(rows)
    out = ROOT / args.out
    atomic_write_json(out / "study.json", {
        **facts, "kind": "label-free-study", "command": " ".join(["python", "benchmarks/label_free_study.py"] + sys.argv[1:]),
        "commit": commit, "threads": torch.get_num_threads(), "seed": SEED, "pools": list(POOLS),
        "wall_seconds": time.perf_counter() - started, "cells": rows, "skipped": skipped, "correlations": summary})
    atomic_write_text(out / "README.md", report(rows, skipped, summary, commit, facts))
    print(f"wrote {out / 'study.json'} and README.md ({len(rows)} cells, {len(skipped)} skipped)")


def correlations(rows: list[dict]) -> list[dict]:
    """Spearman rho of every pool's agreement and -KL with validation and test accuracy, per pair: over all its cells,
    within each K, and over the fresh and the derived cells apart."""
    groups = []
    for pair in sorted({r["pair"] for r in rows}):
        mine = [r for r in rows if r["pair"] == pair]
        groups.append((pair, "all cells", mine))
        for init in sorted({str(r["init"]) for r in mine}):
            part = [r for r in mine if str(r["init"]) == init]
            if len(part) != len(mine):
                groups.append((pair, f"init {init}", part))
        for k in sorted({r["k"] for r in mine}):
            groups.append((pair, f"K={k}", [r for r in mine if r["k"] == k]))
    out = []
    for pair, what, part in groups:
        entry = {"pair": pair, "group": what, "cells": len(part), "rho": {}}
        for pool in POOLS:
            for metric, sign in (("agreement", 1.0), ("kl", -1.0), ("confident_agreement", 1.0)):
                kept = [r for r in part if r["scores"][pool][metric] is not None]
                values = [sign * r["scores"][pool][metric] for r in kept]
                entry["rho"][f"{pool}:{metric}"] = {
                    "val": spearman(values, [r["val_acc"] for r in kept]),
                    "test": spearman(values, [r["test_acc"] for r in kept])}
        out.append(entry)
    return out


def report(rows: list[dict], skipped: list[str], summary: list[dict], commit: str, facts: dict) -> str:
    def rho(value):
        return "" if value is None else f"{value:+.2f}"

    lines = ["# Which label-free estimate tracks accuracy (written by `python benchmarks/label_free_study.py`)", "",
             f"Commit {commit}; device {facts.get('device')}. Every committed CIFAR-10 cell whose student file is "
             "still on disk, re-scored on pools of views of its own few-shot images (none used in training; see the "
             "script's docstring). Spearman's rho of each estimate (agreement, and KL with its sign flipped, so "
             "higher is better for both) with the students' accuracy on the **validation** split (1,000 training "
             "images no few-shot subset uses; the development measure) and, after the slash, with the test "
             "accuracy the cell recorded (shown, not used to choose).", ""]
    for pair in sorted({e["pair"] for e in summary}):
        lines += [f"## {pair}", "", "| cells | n | " + " | ".join(f"{p} agr. / KL / conf. agr. (val; test)"
                                                             for p in POOLS) + " |",
                  "|---|---|" + "---|" * len(POOLS)]
        for e in (e for e in summary if e["pair"] == pair):
            cols = []
            for pool in POOLS:
                a, k, c = (e["rho"][f"{pool}:{m}"] for m in ("agreement", "kl", "confident_agreement"))
                cols.append(f"{rho(a['val'])} / {rho(k['val'])} / {rho(c['val'])} "
                            f"({rho(a['test'])}; {rho(k['test'])}; {rho(c['test'])})")
            lines.append(f"| {e['group']} | {e['cells']} | " + " | ".join(cols) + " |")
        lines.append("")
    lines += ["## Every cell", "", "| cell | K | test | val | recorded agr. | "
              + " | ".join(f"{p} agr." for p in POOLS) + " | " + " | ".join(f"{p} KL" for p in POOLS) + " |",
              "|---|---|---|---|---|" + "---|" * (2 * len(POOLS))]
    for r in sorted(rows, key=lambda r: (r["pair"], r["k"], r["row"], r["seed"])):
        lines.append(f"| {r['cell'].split('cells/')[-1]} | {r['k']} | {r['test_acc']:.2f} | {r['val_acc']:.2f} | "
                     f"{r['recorded_agreement'] if r['recorded_agreement'] is None else round(r['recorded_agreement'], 1)} | "
                     + " | ".join(f"{r['scores'][p]['agreement']:.1f}" for p in POOLS) + " | "
                     + " | ".join(f"{r['scores'][p]['kl']:.3f}" for p in POOLS) + " |")
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
