"""The full-data grid: standard vs spot-adaptive vs anti cells, resumable, with the SAKD table and policy plot."""
from __future__ import annotations

import json

import pytest
import torch

from graftkd.bench import run_grid
from graftkd.errors import GraftkdError
from graftkd.report.fulldata import write_full_report
from graftkd.models import build_model

GRID = """
kind: fulldata
name: mini-sakd
title: digits, standard vs spot-adaptive
data: digits
pairs:
  - {teacher: {file: TEACHER, arch: digits_cnn}, student: digits_cnn_half, homo: true}
distillers: [kd, at]
modes: [standard, sakd, anti]
seeds: [0]
epochs: 2
milestones: [1]
batch_size: 32
limit_train: 256
precision: fp32
full_command: graftkd bench --config configs/mini.yaml
"""


def _config(tmp_path, text: str = GRID):
    torch.manual_seed(0)
    torch.save(build_model("digits_cnn").state_dict(), tmp_path / "teacher.pt")
    path = tmp_path / "grid.yaml"
    path.write_text(text.replace("TEACHER", str(tmp_path / "teacher.pt")))
    return path


@pytest.mark.slow
def test_full_grid_runs_every_cell_then_skips_them_and_reports(tmp_path) -> None:
    config = _config(tmp_path)
    out, runs = tmp_path / "results", tmp_path / "runs"
    first = run_grid(config, out, runs, device="cpu", progress=False)
    assert first["cells"] == 6 and first["ok"] == 6
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "mini-sakd" / "cells").glob("*.json")}
    assert set(cells) == {f"digits_cnn-digits_cnn_half-{d}-{m}-seed0" for d in ("kd", "at")
                          for m in ("standard", "sakd", "anti")}
    sakd = cells["digits_cnn-digits_cnn_half-at-sakd-seed0"]
    assert sakd["routing_spots"] == [[1, 1], [2, 2]] and len(sakd["history"][0]["policy_fraction"]) == 3
    assert sakd["history"][0]["policy_fraction"][0] > 0.9  # homo: starts by distilling everywhere
    for key in ("command", "commit", "seed", "device", "wall_seconds", "protocol", "last_epoch_test_acc"):
        assert key in sakd
    second = run_grid(config, out, runs, device="cpu", progress=False)
    assert second["skipped"] == 6 and second["ok"] == 0
    # a damaged cell file is recomputed, as graftkd bench does for few-shot grids, instead of stopping the grid
    damaged = out / "mini-sakd" / "cells" / "digits_cnn-digits_cnn_half-kd-standard-seed0.json"
    damaged.write_text(damaged.read_text()[:40])
    third = run_grid(config, out, runs, device="cpu", progress=False)
    assert third["skipped"] == 5 and third["ok"] == 1 and json.loads(damaged.read_text())["status"] == "ok"
    written = write_full_report(out / "mini-sakd")
    text = written["markdown"].read_text()
    assert "Shortened protocol" in text and "graftkd bench --config configs/mini.yaml" in text
    assert "Protocol: SGD lr 0.05 momentum" in text and "FLOPs; SGD lr 0.05" in text
    standard = cells["digits_cnn-digits_cnn_half-at-standard-seed0"]["last_epoch_test_acc"]
    assert f"| at | {standard:.2f} | {sakd['last_epoch_test_acc']:.2f} |" in text
    kd = cells["digits_cnn-digits_cnn_half-kd-standard-seed0"]
    assert kd["distiller"] == "kd" and f"| kd | {kd['last_epoch_test_acc']:.2f} |" in text
    assert (out / "mini-sakd" / "policy.png").stat().st_size > 1000


@pytest.mark.parametrize("edit, message", [
    (("distillers: [kd, at]", "distillers: [kd, att]"), "unknown distiller 'att'"),
    (("modes: [standard, sakd, anti]", "modes: [standard, adaptive]"), "modes\\[1\\] must be one of"),
    (("epochs: 2", "epochs: two"), "epochs must be an integer"),
    (("{file: TEACHER, arch: digits_cnn}", "{arch: digits_cnn}"), "needs exactly one of registry"),
])
def test_bad_full_grid_configs_fail_up_front(tmp_path, edit, message) -> None:
    config = _config(tmp_path, GRID.replace(*edit))
    with pytest.raises(GraftkdError, match=message):
        run_grid(config, tmp_path / "r", tmp_path / "runs", device="cpu", progress=False)
    assert not (tmp_path / "r").exists()


def test_report_of_pairs_with_different_learning_rates_states_each_pairs_rate(tmp_path) -> None:
    pairs = [{"teacher": {"registry": "t"}, "student": "wrn_16_2"}, {"teacher": {"registry": "t"}, "student": "shufflev1"}]
    (tmp_path / "cells").mkdir()
    (tmp_path / "grid.json").write_text(json.dumps({"cells": ["a", "b"], "config": {
        "name": "two-lr", "title": "", "modes": ["standard"], "pairs": pairs, "distillers": ["at"], "seeds": [0],
        "epochs": 2}}))
    for name, pair, lr, acc in (("a", pairs[0], 0.05, 9.41), ("b", pairs[1], 0.01, 7.93)):
        (tmp_path / "cells" / f"{name}.json").write_text(json.dumps({
            "status": "ok", "pair": pair, "lr": lr, "teacher_arch": "wrn_40_2", "teacher_acc": 44.32, "params": 1e6,
            "flops": 1e8, "distiller": "at", "mode": "standard", "last_epoch_test_acc": acc, "history": [],
            "protocol": f"fixed spots; SGD lr {lr} momentum 0.9 wd 0.0005, global batch 64"}))
    text = write_full_report(tmp_path)["markdown"].read_text()
    assert "Protocol: SGD lr per pair (stated under each table) momentum 0.9" in text
    assert "FLOPs; SGD lr 0.05" in text and "FLOPs; SGD lr 0.01" in text and "| at | 9.41 |" in text
