"""The fresh-student scaling curve: last-epoch test accuracy against log(samples), from the grid's cell files.

    python benchmarks/derived/grid.py --config configs/cifar10-patient.yaml --pairs resnet56-resnet20 \\
        --rows fresh-50k,fresh-200k --shots 1,10 --seeds 0        # the cells (resumable)
    python benchmarks/patient/curve.py --config configs/cifar10-patient.yaml   # this report

Reads ``results/<name>/cells/<pair>/<row>/k<K>-s<S>.json`` (CPU cells from grid.py, GPU cells from
``benchmarks/device/patient_curve.sh``), writes the grid report (``results.md``/``results.json``) and, beside it,
``curve.png`` and ``curve.json``, and appends the curve table to ``results.md``. Per pair and K, a least-squares
line acc = a + b log10(samples) over every cell gives the budget where it would reach 85 %, with a 68 %
interval from the fit's parameter covariance (delta method on log10 samples). A line through few points says
little beyond them: the report states how many budgets each fit has.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "derived"))
TARGET = 85.0


def samples_of(cell: dict) -> int:
    recipe = cell.get("recipe") or (cell.get("refine") or {}).get("recipe") or {}
    if "samples" in recipe:
        return int(recipe["samples"])
    return int(sum(stage.get("images", 0) for stage in cell.get("stages", [])))


def synth_of(cell: dict) -> int:
    """The synthetic training images a cell added to its few-shot images (0: none): another curve."""
    recipe = cell.get("recipe") or (cell.get("refine") or {}).get("recipe") or {}
    return int(recipe.get("synth") or 0)


def fit(points: list[tuple[float, float]]) -> dict:
    """Least squares acc = a + b x on x = log10(samples); the budget for TARGET and its 68 % interval."""
    n = len(points)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    budgets = sorted(set(xs))
    out: dict = {"cells": n, "budgets": len(budgets)}
    if len(budgets) < 2:
        return out
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    out.update(intercept=a, slope_per_decade=b)
    if b <= 0:
        out["target"] = "not reached: accuracy does not grow with samples in these cells"
        return out
    x85 = (TARGET - a) / b
    out["samples_for_target"] = 10 ** x85
    if n > 2:
        residual = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys)) / (n - 2)
        var_b = residual / sxx
        var_a = residual * (1 / n + mx ** 2 / sxx)
        cov_ab = -mx * residual / sxx
        # x85 = (T - a) / b: d/da = -1/b, d/db = -(T - a)/b^2
        ga, gb = -1 / b, -(TARGET - a) / b ** 2
        sd = math.sqrt(max(0.0, ga * ga * var_a + gb * gb * var_b + 2 * ga * gb * cov_ab))
        out.update(residual_sd=math.sqrt(residual), log10_sd=sd,
                   interval_68=[10 ** (x85 - sd), 10 ** (x85 + sd)])
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/cifar10-patient.yaml")
    args = parser.parse_args(argv)
    from grid import read_cells, report

    config = yaml.safe_load((ROOT / args.config).read_text() if not Path(args.config).is_absolute()
                            else Path(args.config).read_text())
    out = ROOT / "results" / config["name"]
    report(out, config)
    cells = read_cells(out)
    # cells of the same recipe committed by another grid (config key ``also``: pair -> cell files), marked
    borrowed = []
    for pair, files in (config.get("also") or {}).items():
        for name in files:
            cell = json.loads((ROOT / name).read_text())
            borrowed.append(name)
            cells.append({**cell, "pair": pair, "borrowed_from": name})
    curves: dict[tuple[str, int, int], list[dict]] = {}
    for c in cells:  # one curve per pair, K and number of synthetic images
        curves.setdefault((c["pair"], c["fewshot"]["shots"], synth_of(c)), []).append(c)
    rows = []
    for (pair, k, synth), mine in sorted(curves.items()):
        points = [(math.log10(samples_of(c)), c["student"]["test_acc"]) for c in mine]
        by_budget: dict[int, list[dict]] = {}
        for c in mine:
            by_budget.setdefault(samples_of(c), []).append(c)
        rows.append({"pair": pair, "k": k, "synth": synth, "fit": fit(points), "teacher": mine[0]["teacher"]["test_acc"],
                     "points": [{"samples": s, "accuracies": [c["student"]["test_acc"] for c in group],
                                 "agreement": [c["label_free"]["agreement"] for c in group],
                                 "wall_seconds": [c["wall_seconds"] for c in group],
                                 "devices": sorted({c["device"] for c in group}),
                                 "precision": sorted({str(((c.get("refine") or {}).get("speed") or {}).get("chosen"))
                                                      for c in group}),
                                 "from": sorted({c.get("borrowed_from", f"cells/{c['pair']}/{c['row']}") for c in group})}
                                for s, group in sorted(by_budget.items())]})
    (out / "curve.json").write_text(json.dumps({"target": TARGET, "curves": rows}, indent=1))
    _plot(rows, out / "curve.png")
    lines = ["", "## The scaling curve", "",
             f"Last-epoch test accuracy against the samples seen (`curve.png`), and a line acc = a + b·log10(samples) "
             f"fitted per pair, K and number of synthetic training images (`--synth`, none unless the row says) over "
             f"every cell: b is the gain per tenfold budget, and the budget where the line "
             f"reaches {TARGET:.0f} % is an extrapolation, with a 68 % interval from the fit's covariance where there "
             "are more cells than parameters. Written by `python benchmarks/patient/curve.py`."
             + (f" Also in the fits, from another grid with the same recipe: {', '.join(f'`{b}`' for b in borrowed)} "
                "(its device and precision are in `curve.json`)." if borrowed else ""), "",
             "| Pair | K | samples: test acc. (n) | label-free agreement | gain per 10x | budget for 85 % (68 % interval) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        f = r["fit"]
        cells_text = "; ".join(f"{_human(p['samples'])}: {sum(p['accuracies']) / len(p['accuracies']):.2f} "
                               f"({len(p['accuracies'])})" for p in r["points"])
        agree = "; ".join(f"{sum(p['agreement']) / len(p['agreement']):.1f}" for p in r["points"])
        gain = f"{f['slope_per_decade']:+.1f} pts" if "slope_per_decade" in f else "—"
        if "samples_for_target" in f:
            target = _human(f["samples_for_target"])
            target += (f" ({_human(f['interval_68'][0])} – {_human(f['interval_68'][1])})" if "interval_68" in f
                       else f" (no interval: {f['cells']} cells at {f['budgets']} budgets)")
        else:
            target = f.get("target", f"— ({f['budgets']} budget)")
        lines.append(f"| {_name(r)} | {r['k']} | {cells_text} | {agree} | {gain} | {target} |")
    with (out / "results.md").open("a") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"wrote {out / 'curve.png'} and {out / 'curve.json'} ({len(rows)} curves)")
    return {"curves": rows}


def _name(row: dict) -> str:
    return row["pair"] + (f" + {row['synth']:,} synthetic images" if row.get("synth") else "")


def _human(samples: float) -> str:
    return f"{samples / 1e6:.1f}M" if samples >= 1e6 else f"{samples / 1e3:.0f}k"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        xs = [p["samples"] for p in r["points"]]
        means = [sum(p["accuracies"]) / len(p["accuracies"]) for p in r["points"]]
        line, = ax.plot(xs, means, marker="o", label=f"{_name(r)}, K={r['k']}")
        for p in r["points"]:
            ax.scatter([p["samples"]] * len(p["accuracies"]), p["accuracies"], s=10, color=line.get_color(), alpha=0.5)
        f = r["fit"]
        if "slope_per_decade" in f and f["slope_per_decade"] > 0:
            top = max(xs[-1] * 10, min(f.get("samples_for_target", xs[-1]), xs[-1] * 1000))
            grid = [xs[0] * (top / xs[0]) ** (i / 40) for i in range(41)]
            ax.plot(grid, [f["intercept"] + f["slope_per_decade"] * math.log10(g) for g in grid], ls=":",
                    color=line.get_color(), lw=1)
    ax.axhline(TARGET, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("samples seen (log scale)")
    ax.set_ylabel("CIFAR-10 test accuracy (%), last epoch")
    ax.set_title("Fresh students, patient recipe: accuracy vs. training samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
