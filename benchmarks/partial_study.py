"""Partial grafting study (the paper's Table 3 layout): ResNet-56 with one ResNet-20 stage, each in turn, then all.

    GRAFTKD_DATA=../shared/data GRAFTKD_TEACHERS=../shared/teachers \
        python benchmarks/partial_study.py --out results/partial-resnet56

Each row is one ``graftkd distill --replace ...`` run (10-shot CIFAR-10, the same manifest for every row,
seed 0, the CIFAR grid's learning rates) whose result file lands in ``--out``; the table then lists,
per row, the parameters of every block before -> after, the total reduction and the test accuracy of the
last-epoch hybrid against the teacher's. A finished row is not run again (delete its file to redo it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from graftkd.files import atomic_write_json, atomic_write_text  # noqa: E402
from graftkd.engine.runtime import run_facts, resolve_device  # noqa: E402


def rows_for(blocks: int) -> list[list[int]]:
    return [[b] for b in range(1, blocks + 1)] + [list(range(1, blocks + 1))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet56-cifar10")
    parser.add_argument("--student-arch", default="resnet20")
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-lr", type=float, default=2e-3)
    parser.add_argument("--net-lr", type=float, default=1e-3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="results/partial-resnet56")
    parser.add_argument("--runs", default="runs/partial-resnet56")
    args = parser.parse_args(argv)

    from graftkd.data import default_augment, load_dataset
    from graftkd.data.fewshot import make_manifest
    from graftkd.graft import GraftConfig, ScheduleConfig
    from graftkd.commands.distill import distill
    from graftkd.loaded import load_teacher

    out, runs = Path(args.out), Path(args.runs)
    teacher = load_teacher(args.teacher, None, None)
    blocks = len(teacher.model.blocks())
    manifest_path = out / f"k{args.k}-seed{args.seed}-manifest.json"
    manifest = make_manifest(args.data, "train", args.k, args.seed, 0)
    manifest.save(manifest_path)
    fewshot = manifest.materialize()
    test = load_dataset(args.data, "test")
    augment = default_augment(args.data)
    for replace in rows_for(blocks):
        tag = "all" if len(replace) == blocks else f"block{replace[0]}"
        path = out / f"replace-{tag}.json"
        if path.is_file():
            print(f"{tag}: done ({path})")
            continue
        started = time.perf_counter()
        config = GraftConfig(shots=args.k, schedule=ScheduleConfig("cifar10", args.block_lr, args.net_lr),
                             padding=augment.padding, flip=augment.flip, seed=args.seed)
        payload = distill(teacher=load_teacher(args.teacher, None, None), student_arch=args.student_arch,
                          fewshot=fewshot, test=test, config=config, device=args.device, out=runs / tag,
                          progress=False, manifest=manifest.to_dict(), label=f"replace {replace}", replace=replace)
        payload["study_wall_seconds"] = time.perf_counter() - started
        atomic_write_json(path, payload)
        print(f"{tag}: {payload['student']['test_acc']:.2f}% ({payload['student']['params']:,} params)", flush=True)
    write_table(out, teacher_name=args.teacher)
    return 0


def write_table(out: Path, teacher_name: str) -> Path:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("replace-*.json"))]
    rows.sort(key=lambda r: (len(r["student"]["arch_options"]["replace"]), r["student"]["arch_options"]["replace"]))
    if not rows:
        raise SystemExit(f"no replace-*.json in {out}")
    first = rows[0]
    names = [b["block"] for b in first["student"]["blocks"]]
    teacher = first["teacher"]
    lines = [f"# Partial grafting: {teacher['arch']} ({teacher_name}) with {first['student']['arch_options']['student_arch']} "
             f"blocks, {first['fewshot']['shots']}-shot {first['test']['name']}", "",
             f"Protocol: {first['protocol']}; seed {first['seed']}; the same few-shot manifest for every row; "
             "kept blocks are the teacher's (frozen), replaced blocks are grafted (block stage, then network "
             "stages over the replaced blocks). Params per block: teacher -> hybrid.", "",
             "| replaced | " + " | ".join(names) + " | total params (reduction) | test acc. | Δ vs teacher |",
             "|---|" + "---|" * len(names) + "---|---|---|"]
    lines.append("| none (teacher) | " + " | ".join(f"{b['teacher_params']:,}" for b in first["student"]["blocks"])
                 + f" | {teacher['params']:,} | {teacher['test_acc']:.2f}% | – |")
    for row in rows:
        student = row["student"]
        cells = [f"{b['teacher_params']:,} → {b['params']:,}" if b["replaced"] else f"{b['params']:,}"
                 for b in student["blocks"]]
        reduction = 100.0 * (1 - student["params"] / teacher["params"])
        replaced = ",".join(map(str, student["arch_options"]["replace"]))
        lines.append(f"| {replaced} | " + " | ".join(cells) + f" | {student['params']:,} ({reduction:.1f}%) | "
                     f"{student['test_acc']:.2f}% | {student['test_acc'] - teacher['test_acc']:+.2f} |")
    facts = run_facts(resolve_device("cpu"))
    commits = sorted({r["commit"] for r in rows})
    lines += ["", "Every row: `replace-*.json` (command, commit, seed, device, wall time, per-block counts); rows run "
              f"at commit {', '.join(c[:7] for c in commits)} on {rows[0]['device']}. Table written by "
              f"`python benchmarks/{facts['command']}` (finished rows are not rerun)."]
    atomic_write_json(out / "results.json", {"rows": [r["student"] | {"label": r["label"]} for r in rows],
                                             "teacher": teacher, "generated_by": facts["command"]})
    return atomic_write_text(out / "results.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
