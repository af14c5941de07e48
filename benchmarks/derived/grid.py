"""The derived-students grid: pairs x rows x K x seeds, one `graftkd distill` command per cell.

    GRAFTKD_DATA=../shared/data GRAFTKD_TEACHERS=../shared/teachers \\
      python benchmarks/derived/grid.py --config configs/cifar10-derived.yaml --pairs resnet56-resnet20 \\
        --rows derived,derived+repair --shots 1,10 --seeds 0,1,2

Each cell's `result.json` (command, commit, seed, device with its thread count, wall time, the derivation
record, the label-free estimate, test accuracy) is copied to ``results/<name>/cells/<pair>/<row>/k<K>-s<S>.json``
atomically; a cell whose file exists is skipped, so the command resumes. Weights stay under ``runs/``
(git-ignored). ``--report`` writes results.md / results.json from the cell files that exist.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _list(value: str | None, cast=str):
    return None if value is None else [cast(v) for v in value.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--pairs")
    parser.add_argument("--rows")
    parser.add_argument("--shots")
    parser.add_argument("--seeds")
    parser.add_argument("--report", action="store_true", help="only write the report from existing cells")
    parser.add_argument("--quiet", action="store_true",
                        help="print one line per cell instead of its stages (synthesis, training, evaluation)")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    name = config["name"]
    out = ROOT / "results" / name
    pairs = _list(args.pairs) or list(config["pairs"])
    rows = _list(args.rows) or list(config["rows"])
    shots = _list(args.shots, int) or config["shots"]
    seeds = _list(args.seeds, int) or config["seeds"]
    for what, chosen, known in (("pair", pairs, config["pairs"]), ("row", rows, config["rows"])):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            raise SystemExit(f"unknown {what} {', '.join(unknown)}: the config has {', '.join(known)}")
    if not args.report:
        cells = [(p, r, k, s) for p in pairs for k in shots for s in seeds for r in rows]
        env = {**os.environ, "OMP_NUM_THREADS": str(config["threads"]), "MKL_NUM_THREADS": str(config["threads"])}
        for index, (pair, row, k, seed) in enumerate(cells, 1):
            cell = out / "cells" / pair / row / f"k{k}-s{seed}.json"
            if cell.exists():
                print(f"[{index}/{len(cells)}] {pair} {row} K={k} seed {seed}: done, skipped", flush=True)
                continue
            spec = config["pairs"][pair]
            run_dir = ROOT / "runs" / name / pair / row / f"k{k}-s{seed}"
            # --no-synth-cache: a cell's wall time is the whole cost of its command, synthetic images included,
            # even where another row's cell made the same ones
            command = ["graftkd", "distill", "--teacher", spec["teacher"], "--student-arch", spec["student"],
                       "--data", config["data"], "--k", str(k), "--seed", str(seed), "--test-data", config["data"],
                       "--precision", "fp32", "--compile", "off", "--device", "cpu",
                       *(["--no-progress"] if args.quiet else []), "--no-synth-cache",
                       "--out", str(run_dir.relative_to(ROOT)), *config["rows"][row]]
            started = time.perf_counter()
            print(f"[{index}/{len(cells)}] {pair} {row} K={k} seed {seed}: {' '.join(command)}", flush=True)
            code = subprocess.run([str(Path(sys.executable).parent / "graftkd"), *command[1:]], cwd=ROOT, env=env).returncode
            if code != 0:
                print(f"  failed with exit code {code}; the cell stays missing", flush=True)
                continue
            result = json.loads((run_dir / "result.json").read_text())
            cell.parent.mkdir(parents=True, exist_ok=True)
            tmp = cell.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({**result, "grid": name, "pair": pair, "row": row}, indent=1))
            os.replace(tmp, cell)
            print(f"  test {result['student']['test_acc']:.2f}, agreement {result['label_free']['agreement']:.1f}, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    report(out, config)


def _spearman(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return num / den if den else None


def _count(values) -> dict:
    counts: dict = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def read_cells(out: Path) -> list[dict]:
    """The grid's cell files; one from a newer graftkd stops the report with one line (graftkd.records)."""
    from graftkd.records import record_version

    cells = []
    for path in sorted((out / "cells").glob("*/*/*.json")):
        cell = json.loads(path.read_text())
        record_version(cell, path)
        cells.append(cell)
    return cells


def report(out: Path, config: dict) -> None:
    from graftkd.report.runs import run_seconds, seconds_text

    cells = read_cells(out)
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["pair"], c["row"], c["fewshot"]["shots"]), []).append(c)
    lines = [f"# {config['title']}", "",
             "**Protocol:** last-epoch student after the fixed budget; nothing selected on the test split (used only "
             "for this report); few-shot labels never used. Mean ± sample std (n) over seeds 0-2 (seed and subset "
             "together). Development choices were made on a fixed validation split of CIFAR-10 *training* images "
             "(`benchmarks/derived/dev.py`, results in `dev/`), never on test.", "",
             f"**Cells:** {len(cells)} files under `cells/`, each with its `graftkd distill` command, commit, seed, "
             "device (CPU model, threads) and wall time; a cell resumed from its checkpoint adds what its earlier "
             "processes spent (≥: a part of that is unknown). Commits: "
             + ", ".join(f"`{commit}` ({n} cells)" for commit, n in sorted(_count(c["commit"] for c in cells).items()))
             + ".", "",
             "| Pair | Row | K | test acc. mean ± std (n) | label-free agreement (%) | KL | time/run |",
             "|---|---|---|---|---|---|---|"]
    summary = []
    pair_order, row_order = list(config["pairs"]), list(config["rows"])
    for key in sorted(groups, key=lambda k: (pair_order.index(k[0]), k[2], row_order.index(k[1]))):
        runs = groups[key]
        accs = [r["student"]["test_acc"] for r in runs]
        agree = [r["label_free"]["agreement"] for r in runs]
        kls = [r["label_free"]["kl"] for r in runs]
        mean = sum(accs) / len(accs)
        std = (sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5 if len(accs) > 1 else 0.0
        costs = [run_seconds(r) for r in runs]  # a resumed cell counts its earlier processes too
        wall = sum(seconds for seconds, _ in costs) / len(runs)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {mean:.2f} ± {std:.2f} ({len(accs)}) | "
                     f"{sum(agree) / len(agree):.1f} | {sum(kls) / len(kls):.3f} | "
                     f"{seconds_text(wall, all(complete for _, complete in costs))} |")
        summary.append({"pair": key[0], "row": key[1], "k": key[2], "mean": mean, "std": std, "n": len(accs),
                        "accuracies": accs, "agreement": agree, "kl": kls, "wall_seconds": wall})
    lines += ["", "## Does the label-free estimate track test accuracy?", "",
              "Spearman rank correlation between the label-free agreement and test accuracy over the cells of each "
              "pair and K (all rows and seeds), and over all cells of a pair. Cells since the far pool existed "
              "(`graftkd.engine.agreement.far_pool`) also record the agreement on far views; the last three columns "
              "compare both estimates on those cells alone.", "",
              "| Pair | K | cells | Spearman ρ | cells with far views | ρ, near views | ρ, far views |",
              "|---|---|---|---|---|---|---|"]
    correlations = []

    def rho_text(rho):
        return "—" if rho is None else f"{rho:.2f}"

    for pair in pair_order:
        mine = [c for c in cells if c["pair"] == pair]
        for k in sorted({c["fewshot"]["shots"] for c in mine}) + ["all"]:
            sub = [c for c in mine if k == "all" or c["fewshot"]["shots"] == k]
            rho = _spearman([c["label_free"]["agreement"] for c in sub], [c["student"]["test_acc"] for c in sub])
            far = [c for c in sub if "far" in c["label_free"]]
            accs = [c["student"]["test_acc"] for c in far]
            rho_near = _spearman([c["label_free"]["agreement"] for c in far], accs)
            rho_far = _spearman([c["label_free"]["far"]["agreement"] for c in far], accs)
            correlations.append({"pair": pair, "k": k, "cells": len(sub), "spearman": rho, "cells_with_far": len(far),
                                 "spearman_near_on_those": rho_near, "spearman_far": rho_far})
            lines.append(f"| {pair} | {k} | {len(sub)} | {rho_text(rho)} | {len(far)} | {rho_text(rho_near)} | "
                         f"{rho_text(rho_far)} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"rows": summary, "correlations": correlations}, indent=1))
    for pair in pair_order:
        mine = [c for c in cells if c["pair"] == pair]
        if mine:
            # one grid folder per pair beside the others under results/, in the layout `graftkd bench` writes,
            # so whatever reads grid summaries finds these rows; the cells stay in this grid's folder
            folder = out.parent / f"{config['name']}-{pair}"
            folder.mkdir(exist_ok=True)
            (folder / "results.json").write_text(json.dumps(_bench_summary(config, pair, mine), indent=1))
            (folder / "README.md").write_text(
                f"# {config['title']}: {pair}\n\nA summary of `results/{config['name']}/cells/{pair}/` in the layout "
                f"`graftkd bench` writes (written by `python benchmarks/derived/grid.py --config "
                f"configs/{config['name']}.yaml --report`); the report and notes are in `results/{config['name']}/`.\n")
    print(f"wrote {out / 'results.md'} ({len(cells)} cells)")


def _bench_summary(config: dict, pair: str, cells: list[dict]) -> dict:
    """One pair's cells in the summary layout ``graftkd bench`` writes (rows of method x K with a
    ``noise+subset`` variation), so the tools that read bench summaries read these rows too. Every number is
    taken from a cell file, named in ``runs[].file``."""
    name = f"{config['name']}-{pair}"
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["row"], c["fewshot"]["shots"]), []).append(c)
    row_order = list(config["rows"])
    rows = []
    for (row, k) in sorted(groups, key=lambda key: (row_order.index(key[0]), key[1])):
        runs = sorted(groups[(row, k)], key=lambda c: c["seed"])
        accs = [c["student"]["test_acc"] for c in runs]
        mean = sum(accs) / len(accs)
        std = (sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5 if len(accs) > 1 else 0.0
        wall = sum(c["wall_seconds"] for c in runs) / len(runs)
        student = runs[0]["student"]
        rows.append({
            "method": row, "shots": k,
            "student": {"arch": student["arch"], "params": student["params"], "flops": student["flops"]},
            "method_options": {"command_flags": config["rows"][row]},
            "budget": runs[0].get("derive", {}).get("recipe") if runs[0].get("refine") else None,
            "variations": {"noise+subset": {
                "n": len(accs), "mean": mean, "std": std, "min": min(accs), "max": max(accs), "wall_seconds_mean": wall,
                "runs": [{"seed": c["seed"], "subset": c["seed"], "test_acc": c["student"]["test_acc"],
                          "label_free_agreement": c["label_free"]["agreement"], "wall_seconds": c["wall_seconds"],
                          "file": f"../{config['name']}/cells/{pair}/{row}/k{k}-s{c['seed']}.json", "command": c["command"],
                          "commit": c["commit"]} for c in runs],
                "failed": 0}},
            "wall_seconds_mean": wall, "ok": len(runs), "failed": {"n": 0, "errors": []}})
    teacher = cells[0]["teacher"]
    return {
        "grid": name, "title": f"{config['title']}: {pair}",
        "protocol": cells[0]["protocol"] if isinstance(cells[0].get("protocol"), str) else
        "last-epoch student after the fixed budget; nothing selected on the test split; few-shot labels never used",
        "teacher": {"name": teacher["source"], "arch": teacher["arch"], "params": teacher["params"],
                    "flops": teacher["flops"], "test_acc": teacher["test_acc"]},
        "student_arch": cells[0]["student"]["arch"],
        "methods": [r for r in row_order if any(c["row"] == r for c in cells)],
        "shots": sorted({c["fewshot"]["shots"] for c in cells}),
        "cells": len(cells),
        "sources": [{"command": c["command"], "commit": c["commit"], "cells": 1} for c in cells],
        "devices": sorted({c["device"] for c in cells}),
        "rows": rows, "unsupported": {}, "failed": [],
        "coverage": {"present": len(cells)}}


if __name__ == "__main__":
    main()
