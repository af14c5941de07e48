"""The report turns cell files into exact statistics, a Table-1 Markdown file and valid PNG figures."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from graftkd.errors import GraftkdError
from graftkd.report import collect, summarize, write_report
from graftkd.report.plots import _curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BOTH, SUBSET, NOISE = ["noise+subset", "noise"], ["noise+subset"], ["noise"]
TEACHER = {"name": "digits_cnn (trained)", "arch": "digits_cnn", "params": 94218, "flops": 1200000, "test_acc": 98.89}
PROTOCOL = "last-epoch student; the test split is used only for reporting"


def _stages(method: str, with_curves: bool) -> list[dict]:
    def curve(base: float) -> list:
        return [[50, {"test_acc": base, "train_acc": base + 10}], [100, {"test_acc": base + 5, "train_acc": base + 20}]]

    n = 2 if method == "graft" else 1
    return [{"name": f"stage {i + 1}", "epochs": 100, "steps": 200, "seconds": 1.0, "final_loss": 0.1,
             "loss_curve": [[10, 0.5]], "eval_curve": curve(40.0 + 10 * i) if with_curves else []}
            for i in range(n)]


def _cell(method: str, k: int, seed: int, subset: int, variation: list[str], acc: float | None,
          wall: float = 10.0, status: str = "ok", error: str | None = None, curves: bool = True) -> dict:
    cell = {
        "command": "graftkd bench --config configs/digits.yaml", "commit": "abc123", "seed": seed,
        "device": "cpu: x86_64, 2 threads", "started_at": "2026-11-22T05:00:00+0000", "wall_seconds": wall,
        "kind": "bench-cell", "grid": "toy", "method": method, "method_options": {}, "shots": k, "subset": subset,
        "variation": variation, "status": status, "teacher": TEACHER,
        "student": {"arch": "digits_cnn_half", "params": 24100, "flops": 300000, "test_acc": acc, "fewshot_acc": 100.0},
        "budget": {"epochs": 200, "batch_size": 32, "lr": 5e-4, "steps": 400}, "protocol": PROTOCOL,
        "stages": _stages(method, curves) if status == "ok" else [],
    }
    if error:
        cell["error"] = error
    return cell


def _grid(root: Path, curves: bool = True, grid_json: bool = True) -> Path:
    cells = [
        _cell("graft", 1, 0, 0, BOTH, 80.0, wall=10.0, curves=curves),
        _cell("graft", 1, 1, 1, SUBSET, 82.0, wall=12.0, curves=curves),
        _cell("graft", 1, 2, 2, SUBSET, 87.0, wall=14.0, curves=curves),
        _cell("graft", 1, 1, 0, NOISE, 81.0, wall=11.0, curves=curves),
        _cell("graft", 1, 2, 0, NOISE, 85.0, wall=13.0, curves=curves),
        _cell("graft", 5, 0, 0, BOTH, 90.0, curves=curves),
        _cell("graft", 5, 1, 1, SUBSET, 94.0, curves=curves),
        _cell("whole", 1, 0, 0, BOTH, 70.0, curves=curves),
        _cell("whole", 1, 1, 1, SUBSET, None, status="failed", error="NaN loss at step 12"),
        _cell("whole", 5, 0, 0, BOTH, 75.0, curves=curves),
        _cell("whole", 5, 1, 1, SUBSET, 79.0, curves=curves),
        _cell("fitnet", 1, 0, 0, BOTH, None, status="unsupported", error="no hint layer in digits_cnn_half"),
        _cell("fitnet", 5, 0, 0, BOTH, None, status="unsupported", error="no hint layer in digits_cnn_half"),
    ]
    out = root / "toy"
    (out / "cells").mkdir(parents=True)
    for c in cells:
        name = f"{c['method']}-k{c['shots']}-seed{c['seed']}-subset{c['subset']}.json"
        (out / "cells" / name).write_text(json.dumps(c))
    if grid_json:
        (out / "grid.json").write_text(json.dumps({
            "name": "toy", "title": "Toy digits grid", "teacher": TEACHER, "student_arch": "digits_cnn_half",
            "protocol": PROTOCOL, "methods": ["whole", "graft", "fitnet"], "shots": [1, 5],
            "command": "graftkd bench --config configs/digits.yaml", "commit": "abc123"}))
    return out


def _row(summary: dict, method: str, k: int) -> dict:
    return next(r for r in summary["rows"] if r["method"] == method and r["shots"] == k)


def test_statistics_markdown_and_figures(tmp_path):
    grid = _grid(tmp_path)
    (grid / "cells" / "partial.json").write_text("{not json")
    with pytest.warns(UserWarning, match="partial.json"):
        result = write_report(grid)
    assert set(result) >= {"markdown", "json", "plots"}
    assert result["markdown"] == grid / "results.md" and result["json"] == grid / "results.json"

    data = json.loads((grid / "results.json").read_text())
    assert data["methods"] == ["whole", "graft", "fitnet"] and data["shots"] == [1, 5]
    g1 = _row(data, "graft", 1)
    both = g1["variations"]["noise+subset"]  # 80, 82, 87: mean 83, var (9+1+16)/2 = 13
    assert both["n"] == 3 and both["mean"] == pytest.approx(83.0) and both["std"] == pytest.approx(math.sqrt(13))
    assert (both["min"], both["max"]) == (80.0, 87.0)
    noise = g1["variations"]["noise"]  # 80, 81, 85: mean 82, var (4+1+9)/2 = 7
    assert noise["n"] == 3 and noise["mean"] == pytest.approx(82.0) and noise["std"] == pytest.approx(math.sqrt(7))
    assert g1["wall_seconds_mean"] == pytest.approx(12.0)  # 10..14 over the five distinct runs
    g5 = _row(data, "graft", 5)
    assert g5["variations"]["noise+subset"]["std"] == pytest.approx(math.sqrt(8))
    single = g5["variations"]["noise"]  # one run: std is 0.0 and the table says n=1
    assert (single["n"], single["mean"], single["std"]) == (1, 90.0, 0.0)
    w1 = _row(data, "whole", 1)
    assert w1["variations"]["noise+subset"]["n"] == 1 and w1["variations"]["noise+subset"]["std"] == 0.0
    assert w1["failed"] == {"n": 1, "errors": ["NaN loss at step 12"]}
    assert _row(data, "fitnet", 5)["unsupported"]["n"] == 1
    assert data["unsupported"] == {"fitnet": ["no hint layer in digits_cnn_half"]}
    assert data["failed"][0]["seed"] == 1 and data["failed"][0]["method"] == "whole"
    assert _row(data, "graft", 1)["student"]["params"] == 24100

    md = (grid / "results.md").read_text()
    assert "| Teacher: digits_cnn (trained) | full | 94.22K | 1.20M | 98.89 |" in md
    assert f"**Protocol:** {PROTOCOL}." in md
    assert "`graftkd bench --config configs/digits.yaml` @ `abc123` (13 cells)" in md
    assert "| graft | 1 | 24.10K | 0.30M | 83.00 ± 3.61 (n=3) | 82.00 ± 2.65 (n=3) | 12.0 s |" in md
    assert "| whole | 1 | 24.10K | 0.30M | 70.00 ± 0.00 (n=1, 1 failed) | 70.00 ± 0.00 (n=1) |" in md
    assert "| fitnet | 1 | 24.10K | 0.30M | unsupported | unsupported | — |" in md
    assert "| graft | 83.00 ± 3.61 | 92.00 ± 2.83 |" in md  # pivot (seed+subset)
    assert "- **fitnet**: no hint layer in digits_cnn_half" in md
    assert md.index("| whole | 1 |") < md.index("| graft | 1 |") < md.index("| fitnet | 1 |")  # grid.json order
    assert "](accuracy_vs_shots.png)" in md and "](curves.png)" in md

    assert [p.name for p in result["plots"]] == ["accuracy_vs_shots.png", "curves.png"]
    for name in ("accuracy_vs_shots.png", "curves.png"):
        assert (grid / name).read_bytes()[:8] == PNG_MAGIC
    assert not list(grid.glob(".*.tmp"))


def test_without_eval_curves_or_grid_json_skips_curves_cleanly(tmp_path):
    grid = _grid(tmp_path, curves=False, grid_json=False)
    result = write_report(grid)
    assert [p.name for p in result["plots"]] == ["accuracy_vs_shots.png"]
    assert not (grid / "curves.png").exists()
    md = (grid / "results.md").read_text()
    assert "curves.png" not in md and "| Teacher: digits_cnn (trained) |" in md
    assert json.loads((grid / "results.json").read_text())["methods"] == ["graft", "fitnet", "whole"]


def test_summary_is_deterministic_and_curves_concatenate_stages(tmp_path):
    grid = _grid(tmp_path)
    cells = collect(grid)
    assert summarize(cells) == summarize(list(reversed(cells)))
    graft = next(c for c in cells if c["method"] == "graft")
    xs, metrics, boundaries = _curve(graft)
    assert xs == [50.0, 100.0, 150.0, 200.0] and boundaries == [100.0]
    assert metrics["test_acc"] == [40.0, 45.0, 50.0, 55.0]


def test_empty_folder_is_a_clear_error(tmp_path):
    empty = tmp_path / "nothing-here"
    (empty / "cells").mkdir(parents=True)
    with pytest.raises(GraftkdError, match="nothing-here"):
        write_report(empty)
    with pytest.raises(GraftkdError, match="not found"):
        write_report(tmp_path / "missing")


def test_a_partial_grid_says_which_planned_cells_are_missing(tmp_path):
    grid = _grid(tmp_path)
    planned = [p.stem for p in sorted((grid / "cells").glob("*.json"))]
    extra = ["graft-k5-seed2-subset2", "whole-k5-seed2-subset2", "graft-k10-seed0-subset0-curves"]
    raw = json.loads((grid / "grid.json").read_text())
    (grid / "grid.json").write_text(json.dumps({**raw, "cells": planned + extra}))
    write_report(grid)
    coverage = json.loads((grid / "results.json").read_text())["coverage"]
    assert (coverage["planned"], coverage["present"]) == (16, 13) and coverage["missing"] == extra
    assert coverage["missing_by_method_and_k"] == {"graft K=5": 1, "whole K=5": 1, "graft K=10 curves": 1}
    md = (grid / "results.md").read_text()
    assert ("**Coverage: partial grid,** 13 of 16 planned cells have results; missing: graft K=5 (1), "
            "whole K=5 (1), graft K=10 curves (1).") in md

    (grid / "grid.json").write_text(json.dumps({**raw, "cells": planned}))
    write_report(grid)
    assert "**Coverage:** all 13 planned cells have results." in (grid / "results.md").read_text()


def test_a_resumed_runs_time_counts_its_earlier_processes():
    from graftkd.report.runs import run_seconds, seconds_text

    assert run_seconds({"wall_seconds": 100.0, "resumed": None}) == (100.0, True)
    resumed = {"stage": "kd", "epoch": 3, "checkpoint": "c.pt", "seconds_before": 40.0}
    assert run_seconds({"wall_seconds": 100.0, "resumed": resumed}) == (140.0, True)
    # synthetic images this run made before it stopped, read back from its folder: their time counts
    own = {"reused": "synthetic.pt", "seconds": 25.0}
    assert run_seconds({"wall_seconds": 100.0, "resumed": resumed, "synth": own}) == (165.0, True)
    # ... made in this process (already in its wall time), or by another run (cache): nothing to add
    for synth in ({"reused": None, "seconds": 25.0}, {"reused": "cache", "seconds": 25.0},
                  {"reused": "synthetic.pt", "seconds": 25.0, "from_cache": True}):
        assert run_seconds({"wall_seconds": 100.0, "resumed": resumed, "synth": synth}) == (140.0, True)
    # a checkpoint from before graftkd counted: a lower bound, said as such
    unknown = {**resumed, "seconds_before": None}
    assert run_seconds({"wall_seconds": 100.0, "resumed": unknown, "synth": own}) == (125.0, False)
    assert seconds_text(125.0, False) == "≥ 125 s" and seconds_text(140.0) == "140 s" and seconds_text(None) == "—"
    assert run_seconds({}) == (None, False)
