"""The experiment grid: cells, resumability (only missing cells re-run), config validation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from graftkd.bench import GridConfig, grid_cells, load_grid, run_grid
from graftkd.errors import GraftkdError

MINI = """
name: mini
data: digits
teacher:
  train: {arch: digits_cnn, epochs: 1, batch_size: 64, lr: 0.05, padding: 1, flip: false,
          label_smoothing: 0.0, precision: fp32, channels_last: false}
student: digits_cnn_half
preset: digits
block_epochs: 1
net_epochs: 1
methods: {graft: {}, kd: {temperature: 2.0}}
shots: [1]
seeds: [0, 1]
precision: fp32
"""


def _config(tmp_path: Path, text: str = MINI) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def test_cells_vary_seed_and_subset_and_also_seed_alone() -> None:
    config = GridConfig(name="g", data="digits", teacher={"registry": "x"}, student="s",
                        methods={"graft": {}, "kd": {}}, shots=[5, 1], seeds=[0, 1, 2])
    cells = grid_cells(config)
    pairs = sorted({(c.seed, c.subset, c.variations) for c in cells})
    assert pairs == [(0, 0, ("noise+subset", "noise")), (1, 0, ("noise",)), (1, 1, ("noise+subset",)),
                     (2, 0, ("noise",)), (2, 2, ("noise+subset",))]
    assert [c.shots for c in cells][:10] == [1] * 10  # cheap K first
    assert len({c.key for c in cells}) == len(cells) == 2 * 2 * 5


def test_grid_runs_every_cell_once_and_a_rerun_finishes_only_missing_ones(tmp_path) -> None:
    config = _config(tmp_path)
    out, runs = tmp_path / "results", tmp_path / "runs"
    first = run_grid(config, out, runs, device="cpu", progress=False)
    assert first["cells"] == 6 and first["ok"] == 6 and first["skipped"] == 0
    cells = sorted((out / "mini" / "cells").glob("*.json"))
    assert len(cells) == 6
    record = json.loads(cells[0].read_text())
    for key in ("command", "commit", "seed", "device", "wall_seconds", "protocol", "budget", "student", "teacher"):
        assert key in record
    graft = json.loads((out / "mini" / "cells" / "graft-k1-seed0-subset0.json").read_text())
    kd = json.loads((out / "mini" / "cells" / "kd-k1-seed0-subset0.json").read_text())
    assert graft["budget"] == kd["budget"]  # same data, batch, epochs for every method of a cell
    assert graft["budget"]["steps"] == kd["budget"]["steps"] > 0
    assert (out / "mini" / "manifests" / "k1-subset1.json").is_file()
    assert json.loads((out / "mini" / "grid.json").read_text())["methods"] == ["graft", "kd"]

    victim = out / "mini" / "cells" / "kd-k1-seed1-subset1.json"
    victim.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in cells if p.exists()}
    second = run_grid(config, out, runs, device="cpu", progress=False)
    assert second["ok"] == 1 and second["skipped"] == 5
    assert victim.is_file()
    assert all(p.stat().st_mtime_ns == before[p.name] for p in cells if p.name in before)


def test_a_seed_slice_runs_only_its_cells_and_grid_json_still_describes_the_whole_grid(tmp_path) -> None:
    config = _config(tmp_path)
    out, runs = tmp_path / "results", tmp_path / "runs"
    summary = run_grid(config, out, runs, device="cpu", progress=False, only=["kd"], seeds=[1])
    assert summary["cells"] == 2 and summary["ok"] == 2
    assert sorted(p.name for p in (out / "mini" / "cells").glob("*.json")) == [
        "kd-k1-seed1-subset0.json", "kd-k1-seed1-subset1.json"]
    grid = json.loads((out / "mini" / "grid.json").read_text())
    assert grid["methods"] == ["graft", "kd"] and len(grid["cells"]) == 6
    assert grid["last_invocation_cells"] == ["kd-k1-seed1-subset1", "kd-k1-seed1-subset0"]
    with pytest.raises(GraftkdError, match="--seeds \\[7\\] not in"):
        run_grid(config, out, runs, device="cpu", progress=False, seeds=[7])


def test_threads_pins_the_cpu_thread_count_for_the_grid_and_restores_it(tmp_path) -> None:
    import torch

    before = torch.get_num_threads()
    pinned = 1 if before != 1 else 2
    config = _config(tmp_path, MINI + f"threads: {pinned}\n")
    out = tmp_path / "results"
    run_grid(config, out, tmp_path / "runs", device="cpu", progress=False, only=["kd"], seeds=[1])
    cell = json.loads((out / "mini" / "cells" / "kd-k1-seed1-subset1.json").read_text())
    assert cell["device"].endswith(f", {pinned} threads")  # the record says which count produced the number
    assert torch.get_num_threads() == before


def test_curves_only_runs_the_curve_cells_and_a_method_slice_drops_curves_of_other_methods(tmp_path) -> None:
    config = _config(tmp_path, MINI + "curves: {methods: [graft], shots: 1, seed: 0, eval_every: 1}\n")
    out, runs = tmp_path / "results", tmp_path / "runs"
    summary = run_grid(config, out, runs, device="cpu", progress=False, only=["kd"])
    assert summary["cells"] == 3  # kd's cells only: graft's curve cell is not part of a kd slice
    assert not list((out / "mini" / "cells").glob("*curves*"))
    summary = run_grid(config, out, runs, device="cpu", progress=False, curves_only=True)
    assert summary["cells"] == 1 and summary["ok"] == 1
    curve = json.loads((out / "mini" / "cells" / "graft-k1-seed0-subset0-curves.json").read_text())
    assert curve["curves"] is True and not (out / "mini" / "cells" / "graft-k1-seed0-subset0.json").exists()
    with pytest.raises(GraftkdError, match="--curves-only: no curve cells"):
        run_grid(config, out, runs, device="cpu", progress=False, only=["kd"], curves_only=True)


@pytest.mark.parametrize("edit, message", [
    (("shots: [1]", "shot: [1]"), "unknown key 'shot' \\(did you mean 'shots'\\?\\)"),
    (("shots: [1]", "shots: [0]"), "shots must be a list of positive integers"),
    (("name: mini", "name: ../evil"), "name must be letters"),
    (("methods: {graft: {}, kd: {temperature: 2.0}}", "methods: {graft: {}, kdd: {}}"), "did you mean kd"),
    (("methods: {graft: {}, kd: {temperature: 2.0}}", "methods: {kd: {temp: 1}}"), "no option temp"),
    (("methods: {graft: {}, kd: {temperature: 2.0}}", "methods: {kd-hot: {}}"), "method rows 'kd-hot' must be"),
    (("methods: {graft: {}, kd: {temperature: 2.0}}", "methods: {hot: {method: kdd}}"), "did you mean kd"),
    (("methods: {graft: {}, kd: {temperature: 2.0}}", "methods: {hot: {method: 3}}"), "methods.hot.method must"),
    (("seeds: [0, 1]", "seeds: [0, 1"), "not valid YAML"),
    (("shots: [1]", "shots: [1, '5']"), "shots\\[1\\] must be an integer, got '5'"),
    (("shots: [1]", "shots: 1"), "shots must be a list of integers, got 1"),
    (("seeds: [0, 1]", "seeds: [0, 1]\naugment: 'yes'"), "augment must be true/false, got 'yes'"),
    (("\nprecision: fp32", "\nprecision: fp16"), "precision must be one of 'auto', 'fp32', 'bf16'"),
    (("seeds: [0, 1]", "seeds: [0, 1]\nblock_lr: fast"), "block_lr must be a number or a list of numbers or null"),
    (("seeds: [0, 1]", "seeds: [0, 1]\nthreads: 0"), "threads must be >= 1"),
    (("seeds: [0, 1]", "seeds: [0, 1]\npreset: cifar1000"), "preset must be one of cifar10, cifar100"),
    (("seeds: [0, 1]", "seeds: [0, 1]\ncurves: {methods: [fitnet]}"), "curves.methods fitnet not in methods"),
    (("seeds: [0, 1]", "seeds: [0, 1]\ncurves: {every: 3}"), "unknown key 'curves.every'"),
    (("epochs: 1, batch_size", "epochs: many, batch_size"), "teacher.train.epochs must be an integer, got 'many'"),
    (("train: {arch: digits_cnn,", "train: {arch: digits_cnn, lr_decay: 2,"), "unknown key 'teacher.train.lr_decay'"),
])
def test_bad_grid_configs_fail_before_any_training(tmp_path, edit, message) -> None:
    config = _config(tmp_path, MINI.replace(*edit))
    with pytest.raises(GraftkdError, match=message):
        run_grid(config, tmp_path / "r", tmp_path / "runs", device="cpu", progress=False)
    assert not (tmp_path / "r").exists()


def test_a_row_may_run_another_method_with_other_options() -> None:
    from graftkd.bench import build_row_method

    hot = build_row_method("kd_hot", {"method": "kd", "temperature": 8.0})
    assert hot.name == "kd" and hot.options["temperature"] == 8.0
    assert build_row_method("kd", None).options["temperature"] != 8.0


def test_committed_configs_are_valid() -> None:
    import yaml

    from graftkd.bench.fulldata import FullGridConfig

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if raw.get("kind") == "fulldata":
            FullGridConfig.from_dict(raw, str(path))
        elif raw.get("kind") == "distill-grid":  # benchmarks/derived/grid.py: one `graftkd distill` per cell
            from graftkd.cli import build_parser

            for pair in raw["pairs"].values():
                for flags in raw["rows"].values():
                    build_parser().parse_args(["distill", "--teacher", pair["teacher"], "--student-arch",
                                               pair["student"], "--data", raw["data"], "--k", "1", *flags])
            assert raw["shots"] and raw["seeds"] and raw["threads"] >= 1
        else:
            load_grid(path)


def test_readme_digits_table_matches_the_committed_report() -> None:
    root = Path(__file__).resolve().parents[1]
    report = root / "results" / "digits" / "results.json"
    if not report.is_file():
        pytest.skip("no committed digits report")
    rows = json.loads(report.read_text())["rows"]
    readme = (root / "README.md").read_text().splitlines()
    for row in rows:
        stats = row["variations"]["noise+subset"]
        line = next(x for x in readme if x.startswith(f"| {row['method']} | "))
        assert f"{stats['mean']:.2f} ± {stats['std']:.2f}" in line, (row["method"], row["shots"])


def test_readme_vgg_table_matches_the_committed_report() -> None:
    """The README's VGG16 table (one line per K, one column per method) is copied from results.json."""
    root = Path(__file__).resolve().parents[1]
    report = root / "results" / "cifar10-vgg16-graft" / "results.json"
    if not report.is_file():
        pytest.skip("no committed VGG16 report")
    readme = (root / "README.md").read_text().splitlines()
    header = next(x for x in readme if x.startswith("| method | graft | kd | fitnet | whole | fskd | cross |"))
    methods = [c.strip() for c in header.strip("|").split("|")][1:]
    stats = {(r["method"], r["shots"]): r["variations"]["noise+subset"] for r in json.loads(report.read_text())["rows"]}
    checked = 0
    for line in readme[readme.index(header) + 2:]:
        if not line.startswith("| K="):
            break
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        shots = int(cells[0][2:])
        for method, cell in zip(methods, cells[1:]):
            s = stats[(method, shots)]
            assert cell == f"{s['mean']:.2f} ± {s['std']:.2f}", (method, shots)
            checked += 1
    assert checked >= 12  # K=1 and K=2 for six methods


def test_parallel_jobs_give_the_numbers_of_a_sequential_run(tmp_path) -> None:
    """--jobs 2 runs cells in two processes at the grid's thread count: every cell's accuracy and losses equal
    the sequential run's, and the grid-trained teacher is trained once and reused."""
    config = _config(tmp_path, MINI + "threads: 1\n")
    seq = run_grid(config, tmp_path / "seq", tmp_path / "runs_seq", device="cpu", progress=False)
    par = run_grid(config, tmp_path / "par", tmp_path / "runs_par", device="cpu", progress=False, jobs=2)
    assert seq["ok"] == par["ok"] == 6 and par["jobs"] == 2 and par["threads_per_job"] == 1
    for cell in sorted((tmp_path / "seq" / "mini" / "cells").glob("*.json")):
        a = json.loads(cell.read_text())
        b = json.loads((tmp_path / "par" / "mini" / "cells" / cell.name).read_text())
        assert a["student"]["test_acc"] == b["student"]["test_acc"], cell.name
        assert [s.get("final_loss") for s in a["stages"]] == [s.get("final_loss") for s in b["stages"]], cell.name
        assert "1 threads" in b["device"]
    again = run_grid(config, tmp_path / "seq", tmp_path / "runs_seq", device="cpu", progress=False)
    assert again["skipped"] == 6
    with pytest.raises(GraftkdError, match="--jobs"):
        run_grid(config, tmp_path / "x", tmp_path / "y", device="cpu", progress=False, jobs=0)


def test_keep_students_saves_a_student_file_that_export_and_evaluate_take(tmp_path) -> None:
    from graftkd.cli import main

    config = _config(tmp_path, MINI.replace("seeds: [0, 1]", "seeds: [0]") + "keep_students: true\n")
    run_grid(config, tmp_path / "r", tmp_path / "runs", device="cpu", progress=False, only=["kd"])
    cell = json.loads((tmp_path / "r" / "mini" / "cells" / "kd-k1-seed0-subset0.json").read_text())
    weights = Path(cell["student"]["file"])
    assert weights.is_file() and weights.name == "student.pt"
    assert main(["evaluate", "--weights", str(weights), "--data", "digits", "--no-progress"]) == 0
    assert main(["export", "--weights", str(weights), "--out", str(tmp_path / "x"), "--formats", "state_dict"]) == 0
