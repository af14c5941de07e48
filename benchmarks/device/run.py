"""One prepared script for a lent GPU: parts in a fixed order, inside one time budget, resumable across calls.

    bash benchmarks/device/run.sh [--parts speed,teacher_speed,vgg16_grid,patient_curve,fresh_synth,derived_budget]
        [--budget-s 540] [--dry-run]

Before the call, on this machine: ``python benchmarks/device/pack.py`` (the few-shot draws, the test split as a
uint8 tensor and the teachers, in ``device-payload/``; the archives never travel). The call carries
``device-payload`` and, to resume, ``device-runs`` (the checkpoints an earlier call brought back).

Parts, in order (``--parts`` picks some):

* ``speed``: ``benchmarks/graft_speed.py`` for VGG16-BN -> vgg16-graft and ResNet-56 -> ResNet-20;
* ``teacher_speed``: supervised training throughput of VGG16-BN, ResNet-20 and ResNet-56;
* ``vgg16_grid``: the VGG16 grid's missing K=5 and K=10 cells (``configs/cifar10-vgg16-graft.yaml``, every method),
  as many as the budget allows, by ``graftkd bench`` on the draws ``pack.py --bench-grid`` packed; the cells
  committed here are skipped, the new ones land in ``$OUT/results/cifar10-vgg16-graft/cells/``. A cell the budget
  cuts starts again on the next call: a VGG cell's checkpoint (about 65 MB) cannot travel with the teacher;
* ``patient_curve``: the fresh-student scaling curve's 10 M-sample points (configs/cifar10-patient.yaml rows
  ``fresh-10m``), each a ``graftkd distill`` run whose cell file lands in
  ``$OUT/results/cifar10-patient/cells/`` in the layout ``benchmarks/derived/grid.py`` writes;
* ``fresh_synth``: a fresh ResNet-20 at 10 M samples on the few-shot images plus 10,000 images synthesised from
  them and the teacher's BatchNorm statistics (configs/cifar10-patient.yaml row ``fresh-10m-synth10000``): on the
  CPU, 1,000 such images lifted a fresh K=1 student from 25.9 to 37.5 % at 200k samples, the largest lever found
  for fresh students. Its cells land in ``$OUT/results/cifar10-patient/cells/``;
* ``derived_budget``: the derived default path for ResNet-56 -> ResNet-20 at 2 M samples (configs/cifar10-derived.yaml
  row ``default-t16-2m``, 8x the CPU cells' budget): how far the derived student goes with compute. Its cells land
  in ``$OUT/results/cifar10-derived/cells/``.

The grid parts take each cell's options from the committed grid config's row, so a cell's recorded command is
the grid's (a dry run only shrinks ``--samples``).

Each part starts only if the budget has room for it; a run that meets the end of the budget is stopped with
SIGINT, saves its checkpoint under ``$OUT/device-runs`` and resumes on the next call. Every file written goes
under ``$OUT`` (default ``./device-out``). ``--dry-run`` does one step of each part on the CPU, on a small pack,
in well under a minute: the check that the script works before a GPU call is spent on it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("speed", "teacher_speed", "vgg16_grid", "patient_curve", "fresh_synth", "derived_budget")
# bench part -> (grid config, K values); the few-shot draws come from the payload (pack.py --bench-grid)
BENCH_PARTS = {"vgg16_grid": ("configs/cifar10-vgg16-graft.yaml", (5, 10))}
# grid part -> (grid config, row, [(pair, shots, seed)], most informative first); teacher and student come from the
# config's pair
GRID_PARTS = {
    "patient_curve": ("configs/cifar10-patient.yaml", "fresh-10m",
                      [("resnet56-resnet20", 10, 0), ("resnet56-resnet20", 1, 0),
                       ("vgg16bn-resnet18", 10, 0), ("vgg16bn-resnet18", 1, 0)]),
    "fresh_synth": ("configs/cifar10-patient.yaml", "fresh-10m-synth10000",
                    [("resnet56-resnet20", 10, 0), ("resnet56-resnet20", 1, 0)]),
    "derived_budget": ("configs/cifar10-derived.yaml", "default-t16-2m",
                       [("resnet56-resnet20", 10, 0), ("resnet56-resnet20", 1, 0)]),
}
DRY_RUN_SAMPLES = "128"


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _run(command: list[str], budget: Budget, log: Path, env: dict | None = None) -> int | None:
    """Run ``command`` until it ends or the budget does (then SIGINT, so it checkpoints); None: stopped."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        process = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
        try:
            return process.wait(timeout=max(1.0, budget.left()))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            return None


def part_speed(args, budget: Budget, out: Path) -> dict:
    done = {}
    extra = ["--shots", "1", "--repeats", "1", "--warmup", "0", "--epochs-scale", "0.001", "--skip-formats",
             "--eval", "off"] if args.dry_run else []
    pairs = (("vgg16_bn", "vgg16_graft_bn"), ("resnet56", "resnet20"))
    for teacher, student in pairs[-1:] if args.dry_run else pairs:  # a dry run checks the script, not every pair
        target = out / "benchmarks" / "results" / f"graft_speed-{args.device_name}-{teacher}-{student}.json"
        if target.exists():
            done[student] = "done before"
            continue
        code = _run([sys.executable, "benchmarks/graft_speed.py", "--teacher", teacher, "--student", student,
                     "--device", args.device, "--out", str(target), *extra], budget, out / "logs" / "speed.log")
        done[student] = {0: "ok", None: "stopped by the budget"}.get(code, f"exit {code}")
    return done


def part_teacher_speed(args, budget: Budget, out: Path) -> dict:
    target = out / "benchmarks" / "results" / f"teacher_speed-{args.device_name}.json"
    if target.exists():
        return {"teacher_speed": "done before"}
    extra = ["--warmup", "0", "--steps", "1", "--batch-size", "8", "--models", "resnet20"] if args.dry_run else []
    code = _run([sys.executable, "benchmarks/teacher_speed.py", "--device", args.device, "--out", str(target),
                 *extra], budget, out / "logs" / "teacher_speed.log")
    return {"teacher_speed": {0: "ok", None: "stopped by the budget"}.get(code, f"exit {code}")}


def part_vgg16_grid(args, budget: Budget, out: Path) -> dict:
    return _bench_cells("vgg16_grid", args, budget, out)


def _bench_cells(part: str, args, budget: Budget, out: Path) -> dict:
    """A ``graftkd bench`` grid's cells at the part's K values, on the packed draws and test split."""
    import yaml

    from graftkd.data import resolve_augment
    from graftkd.data.fewshot import FewShotManifest
    from graftkd.files import atomic_write_json, atomic_write_text

    config_file, shots = BENCH_PARTS[part]
    grid = yaml.safe_load((ROOT / config_file).read_text())
    name, teacher = grid["name"], grid["teacher"]["registry"]
    payload = Path(args.payload).resolve()
    packed = sorted((payload / "bench" / name / "manifests").glob("*.json"))
    if not packed or not _has_teacher(teacher, payload / "teachers"):
        return {name: f"skipped: {payload} lacks the grid's draws or its teacher (pack.py --bench-grid {config_file} "
                      f"--teachers {teacher})"}
    if budget.left() < 60:
        return {name: "no time left in this call"}
    results = out / "results"
    cells = results / name / "cells"
    for file in packed:  # the bench's own manifest files, pointing into the pack wherever the call runs
        atomic_write_json(results / name / "manifests" / file.name,
                          {**FewShotManifest.load(file).to_dict(), "source": str(payload / "data.pt")})
    committed = ROOT / "results" / name / "cells"
    done_here = [f for k in shots for f in committed.glob(f"*-k{k}-*.json")] if not args.dry_run else []
    for file in done_here:  # the part's cells committed here: the bench skips them
        if not (cells / file.name).exists():
            cells.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, cells / file.name)
    before = {f.name for f in cells.glob("*.json")} if cells.is_dir() else set()
    # the grid as committed, reading the pack: its test split, and the crop and flip the source's name chose
    augment = resolve_augment(grid["data"], grid.get("padding"), grid.get("flip"))
    device_grid = {**grid, "data": str(payload / "data.pt"), "padding": augment.padding, "flip": augment.flip}
    config = out / "configs" / Path(config_file).name
    atomic_write_text(config, yaml.safe_dump(device_grid, sort_keys=False))
    # a dry run: the one cell of the cheapest method (the pruned teacher, no training) at the smallest K
    picked = (["--methods", "pruned_only", "--seeds", str(grid["seeds"][0]), "--shots", str(min(shots))]
              if args.dry_run else ["--shots", ",".join(str(k) for k in shots)])
    code = _run([str(Path(sys.executable).parent / "graftkd"), "bench", "--config", str(config), "--out",
                 str(results), "--runs", str(out / "device-runs" / "bench"), "--device", args.device, "--no-progress",
                 "--no-report", *picked], budget, out / "logs" / f"{part}.log",
                env={"GRAFTKD_TEACHERS": str(payload / "teachers")})
    made = sorted({f.name for f in cells.glob("*.json")} - before) if cells.is_dir() else []
    state = {0: "all done", None: "stopped by the budget: the rest next call"}.get(code, f"exit {code}")
    return {name: f"{state}; {len(made)} new cells", "new_cells": made}


def part_patient_curve(args, budget: Budget, out: Path) -> dict:
    return _grid_cells("patient_curve", args, budget, out)


def part_fresh_synth(args, budget: Budget, out: Path) -> dict:
    return _grid_cells("fresh_synth", args, budget, out)


def part_derived_budget(args, budget: Budget, out: Path) -> dict:
    return _grid_cells("derived_budget", args, budget, out)


def row_options(config: Path, row: str, dry_run: bool) -> tuple[dict, list[str]]:
    """The grid config and its row's options as tokens; a dry run's ``--samples`` shrunk to a few steps, and its
    synthetic images to one step of the fewest that make a batch."""
    import yaml

    grid = yaml.safe_load(config.read_text())
    tokens = [str(t) for t in grid["rows"][row]]
    if dry_run:
        if "--samples" in tokens:
            tokens[tokens.index("--samples") + 1] = DRY_RUN_SAMPLES
        else:
            tokens += ["--samples", DRY_RUN_SAMPLES]
        if "--synth" in tokens:
            tokens[tokens.index("--synth") + 1] = "2"
            tokens += ["--synth-steps", "1"]
    return grid, tokens


def _grid_cells(part: str, args, budget: Budget, out: Path) -> dict:
    """Run the part's cells, each a ``graftkd distill`` with the grid row's options, resumable across calls."""
    config, row, points = GRID_PARTS[part]
    grid, options = row_options(ROOT / config, row, args.dry_run)
    payload = Path(args.payload)
    done = {}
    for pair, k, seed in points[1:2] if args.dry_run else points:
        teacher, student = grid["pairs"][pair]["teacher"], grid["pairs"][pair]["student"]
        key = f"{pair}/{row}/k{k}-s{seed}"
        manifest = payload / "fewshot" / f"k{k}-s{seed}.json"
        cell = out / "results" / grid["name"] / "cells" / pair / row / f"k{k}-s{seed}.json"
        committed = ROOT / "results" / grid["name"] / "cells" / pair / row / cell.name
        if cell.exists() or (committed.exists() and not args.dry_run):
            done[key] = "done before"
            continue
        if not manifest.exists() or not _has_teacher(teacher, payload / "teachers"):
            done[key] = f"skipped: {payload} lacks its draw or its teacher (pack.py --teachers {teacher})"
            continue
        if budget.left() < 60:
            done[key] = "no time left in this call"
            continue
        previous = Path(args.runs) / pair / row / f"k{k}-s{seed}"
        run_dir = out / "device-runs" / pair / row / f"k{k}-s{seed}"
        if previous.is_dir() and not run_dir.exists():  # an earlier call's checkpoint: continue from it
            shutil.copytree(previous, run_dir)
        command = ["graftkd", "distill", "--teacher", teacher, "--student-arch", student,
                   "--fewshot", str(manifest), "--test-data", str(payload / "data.pt"), "--seed", str(seed),
                   *options, "--device", args.device, "--no-progress", "--out", str(run_dir)]
        started = time.perf_counter()
        code = _run([str(Path(sys.executable).parent / "graftkd"), *command[1:]], budget,
                    out / "logs" / f"{part}.log", env={"GRAFTKD_TEACHERS": str(payload / "teachers")})
        if code != 0:
            done[key] = "stopped by the budget: resumes next call" if code is None else f"exit {code}"
            continue
        result = json.loads((run_dir / "result.json").read_text())
        cell.parent.mkdir(parents=True, exist_ok=True)
        cell.write_text(json.dumps({**result, "grid": grid["name"], "pair": pair, "row": row,
                                    "command": " ".join(command)}, indent=1))
        done[key] = f"test {result['student']['test_acc']:.2f} in {time.perf_counter() - started:.0f} s"
    return done


def _has_teacher(name: str, folder: Path) -> bool:
    """Whether the payload carries the registered file of teacher ``name`` (the registry's own lookup)."""
    from graftkd.errors import GraftkdError
    from graftkd.models.teacher_registry import find_teacher_file, load_registry

    try:
        return find_teacher_file(load_registry().get(name), folder).parent == folder
    except GraftkdError:
        return False


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, in this order: {', '.join(PARTS)}")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="wall-clock seconds for the whole call (default 540: a 600 s call with room to copy back)")
    parser.add_argument("--payload", default="device-payload", help="the folder benchmarks/device/pack.py wrote")
    parser.add_argument("--runs", default="device-runs", help="checkpoints an earlier call brought back")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="one step of each part, on the CPU")
    parser.add_argument("--out", default=os.environ.get("OUT", "device-out"))
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part {', '.join(unknown)}: use {', '.join(PARTS)}")
    if args.dry_run:
        args.device = "cpu"
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device here: run on the lent GPU, or check the script with --dry-run")
        args.device_name = "gpu"
    else:
        args.device_name = "cpu-dry-run" if args.dry_run else "cpu"
    if set(parts) & {*GRID_PARTS, *BENCH_PARTS} and not (Path(args.payload) / "data.pt").exists():
        raise SystemExit(f"{args.payload}/data.pt not found: run python benchmarks/device/pack.py first and carry "
                         "its folder")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    report = {"parts": {}, "budget_s": args.budget_s, "dry_run": args.dry_run}
    for part in (p for p in PARTS if p in parts):
        started = time.perf_counter()
        report["parts"][part] = {"outcome": globals()[f"part_{part}"](args, budget, out),
                                 "seconds": round(time.perf_counter() - started, 1)}
        print(f"{part}: {json.dumps(report['parts'][part])}", flush=True)
    (out / "device-report.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
