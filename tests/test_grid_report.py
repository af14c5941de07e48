"""The derived grid's report (``benchmarks/derived/grid.py --report``): rank correlations of both label-free pools."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CELLS = ROOT / "results" / "cifar10-derived" / "cells" / "resnet56-resnet20" / "default-synth-choice-512k"


def _grid_module():
    spec = importlib.util.spec_from_file_location("derived_grid", ROOT / "benchmarks" / "derived" / "grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (CELLS / "k1-s2.json").exists(), reason="the committed ResNet-20 cells are not here")
def test_the_report_ranks_the_near_and_the_far_pool_against_test_accuracy_on_the_same_cells(tmp_path) -> None:
    """Three committed cells, their numbers set so that the near pool ranks them backwards and the far pool in
    order, and a fourth without far views: the near ρ counts it, the two comparison columns do not."""
    grid = _grid_module()
    out = tmp_path / "grid"
    folder = out / "cells" / "resnet56-resnet20" / "row"
    folder.mkdir(parents=True)
    for seed in range(4):
        cell = json.loads((CELLS / f"k1-s{min(seed, 2)}.json").read_text())
        cell.update(row="row", seed=seed)
        cell["student"]["test_acc"] = 80.0 + seed
        cell["label_free"]["agreement"] = 90.0 - seed
        if seed == 3:
            cell["label_free"].pop("far")
        else:
            cell["label_free"]["far"]["agreement"] = 50.0 + seed
        (folder / f"k1-s{seed}.json").write_text(json.dumps(cell))
    config = {"name": "grid", "title": "t", "pairs": {"resnet56-resnet20": {}}, "rows": {"row": []}}
    grid.report(out, config)
    first = json.loads((out / "results.json").read_text())["correlations"][0]
    assert first == {"pair": "resnet56-resnet20", "k": 1, "cells": 4, "spearman": pytest.approx(-1.0),
                     "cells_with_far": 3, "spearman_near_on_those": pytest.approx(-1.0),
                     "spearman_far": pytest.approx(1.0)}
    assert "| resnet56-resnet20 | 1 | 4 | -1.00 | 3 | -1.00 | 1.00 |" in (out / "results.md").read_text()
