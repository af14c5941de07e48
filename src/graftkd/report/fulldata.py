"""The full-data grid's report: the SAKD table (per pair: distiller rows, Stan. / Adap. / Anti columns,
last-epoch test accuracy, mean ± std over seeds) and a plot of the policy's per-spot distillation fractions,
from the cell files ``graftkd bench`` wrote; reads result files only."""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from graftkd.files import atomic_write_json, atomic_write_text, read_json
from graftkd.records import record_version

GRID_KIND = "fulldata-grid"  # the kind of the grid.json a full-data grid writes: this module reads it
MODE_LABELS = {"standard": "Stan.", "sakd": "Adap.", "anti": "Anti"}


def write_full_report(results_dir: str | Path) -> dict:
    """results.md / results.json (the SAKD table) and policy.png from a full-data grid's cell files."""
    results_dir = Path(results_dir)
    grid = json.loads((results_dir / "grid.json").read_text())
    config = grid["config"]
    cells = []
    for path in sorted((results_dir / "cells").glob("*.json")):
        cell = read_json(path)
        if isinstance(cell, dict):
            record_version(cell, path)  # a newer graftkd's cell stops the report with one line
            cells.append(cell)
    ok = [c for c in cells if c.get("status") == "ok"]
    modes = config["modes"]
    lines = [f"# {config.get('title') or config['name']}", ""]
    protocol = ok[0]["protocol"].split("; ", 1)[-1] if ok else ""  # drop the mode: the columns say it
    if len({c.get("lr") for c in ok}) > 1:  # e.g. 0.01 for ShuffleNet students: each pair states its own
        protocol = re.sub(r"SGD lr \S+", "SGD lr per pair (stated under each table)", protocol)
    if ok and ok[0].get("shortened"):
        lines += [f"**Shortened protocol** ({config['epochs']} epochs, {ok[0]['train_images']} training images): "
                  "a smoke-scale run on CPU, not the benchmark's numbers."
                  + (f" Full protocol: `{config['full_command']}`." if config.get("full_command") else ""), ""]
    lines += [f"Protocol: {protocol}. Test accuracy (%) of the last-epoch student, mean ± std over seeds "
              f"{config['seeds']}; nothing selected on the test split. Stan. = the distiller at its fixed spots "
              "on every sample; Adap. = spot-adaptive KD (SAKD: a policy picks, per sample, the spots to distil "
              "at); Anti = SAKD's masks inverted. Row kd = logit KD only (no feature distiller).", ""]
    table: dict[str, Any] = {}
    for pair in config["pairs"]:
        rows = [c for c in ok if c["pair"] == pair]
        if not rows:
            continue
        first = rows[0]
        title = f"{first['teacher_arch']} ({first['teacher_acc']:.2f}%) → {pair['student']}"
        lines += [f"## {title}", "", f"student: {first['params'] / 1e6:.2f}M params, {first['flops'] / 1e6:.1f}M FLOPs; SGD lr {first['lr']:g}", "",
                  "| distiller | " + " | ".join(MODE_LABELS[m] for m in modes) + " |",
                  "|---|" + "---|" * len(modes)]
        for distiller in config["distillers"]:
            cells_md = []
            for mode in modes:
                accs = [c["last_epoch_test_acc"] for c in rows if c["distiller"] == distiller and c["mode"] == mode
                        and c.get("last_epoch_test_acc") is not None]
                table.setdefault(title, {}).setdefault(distiller, {})[mode] = accs
                if not accs:
                    cells_md.append("–")
                elif len(accs) == 1:
                    cells_md.append(f"{accs[0]:.2f}")
                else:
                    cells_md.append(f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}")
            lines.append(f"| {distiller} | " + " | ".join(cells_md) + " |")
        lines.append("")
    failed = [c for c in cells if c.get("status") != "ok"]
    if failed:
        lines += ["Failed cells: " + "; ".join(f"{c['distiller']}/{c['mode']}: {c.get('error', '')}" for c in failed), ""]
    plot = plot_policy(ok, results_dir / "policy.png")
    if plot:
        lines += ["![fraction of samples distilled per spot and epoch](policy.png)", ""]
    lines += [f"Cells: {len(ok)} of {len(grid['cells'])} finished; every number comes from `cells/*.json` "
              "(command, commit, seed, device, wall time recorded in each)."]
    markdown = atomic_write_text(results_dir / "results.md", "\n".join(lines) + "\n")
    data = atomic_write_json(results_dir / "results.json", {"protocol": protocol, "table": table})
    return {"markdown": markdown, "json": data, "plots": [plot]}


def plot_policy(cells: list[dict], path: Path) -> Path | None:
    """SAKD's policy statistics: fraction of samples routed to the teacher (distilled) per spot, per epoch."""
    from graftkd.report.plots import _figure, _save_png

    adaptive = [c for c in cells if c.get("mode") in ("sakd", "anti") and c["history"]
                and "policy_fraction" in c["history"][0]]
    if not adaptive:
        return None
    fig = _figure(6.4, 1.0 + 2.2 * len(adaptive))
    for row, cell in enumerate(adaptive):
        ax = fig.add_subplot(len(adaptive), 1, row + 1)
        epochs = [h["epoch"] for h in cell["history"]]
        spots = len(cell["history"][0]["policy_fraction"])
        for k in range(spots):
            label = "logits" if k == spots - 1 else f"spot {k + 1}"
            ax.plot(epochs, [h["policy_fraction"][k] for h in cell["history"]], marker="o", label=label)
        ax.set_ylim(-0.02, 1.02)
        # the recorded statistic is the policy's own decision; anti distils the complement of it
        ax.set_ylabel("policy: distil" if cell["mode"] == "anti" else "fraction distilled")
        ax.set_title(f"{cell['teacher_arch']}→{cell['student_arch']}, {cell['distiller']}, {cell['mode']}, "
                     f"seed {cell['seed']}" + (" (masks inverted: 1 − this is distilled)" if cell["mode"] == "anti"
                                               else ""), fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    ax.set_xlabel("epoch")
    return _save_png(fig, path)


