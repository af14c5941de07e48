"""benchmarks/repro_check.py: the row test (fresh mean within the committed std) and its bookkeeping."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "repro_check.py"
_spec = importlib.util.spec_from_file_location("repro_check", _SCRIPT)
repro_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(repro_check)


def _row(method: str, shots: int, accs: dict[tuple[int, int], float], std: float) -> dict:
    runs = [{"seed": s, "subset": u, "test_acc": a} for (s, u), a in accs.items()]
    mean = sum(accs.values()) / len(accs)
    return {"method": method, "shots": shots,
            "variations": {"noise+subset": {"n": len(runs), "mean": mean, "std": std, "runs": runs}}}


def _report(*rows: dict) -> dict:
    return {"rows": list(rows), "sources": [{"command": "graftkd bench", "commit": "0" * 40}]}


def test_rows_within_and_outside_the_committed_std_and_missing_rows() -> None:
    committed = _report(
        _row("graft", 1, {(0, 0): 50.0, (1, 1): 60.0, (2, 2): 70.0}, std=10.0),
        _row("kd", 1, {(0, 0): 80.0, (1, 1): 81.0, (2, 2): 82.0}, std=1.0),
        _row("fskd", 1, {(0, 0): 90.0}, std=0.0),
        _row("cross", 1, {(0, 0): 20.0}, std=0.0),
    )
    fresh = _report(
        _row("graft", 1, {(0, 0): 50.0, (1, 1): 60.0, (2, 2): 79.0}, std=14.5),  # mean 63.0: +3 <= 10
        _row("kd", 1, {(0, 0): 80.0, (1, 1): 83.0, (2, 2): 84.0}, std=2.1),  # mean 82.33: +1.33 > 1
        _row("fskd", 1, {(0, 0): 90.4}, std=0.0),  # n=1: within the fixed 0.5-point tolerance
    )
    result = repro_check.compare(committed, fresh)
    by_method = {r["method"]: r for r in result["rows"]}
    assert by_method["graft"]["within"] and by_method["graft"]["diff"] == pytest.approx(3.0)
    assert not by_method["kd"]["within"] and by_method["kd"]["diff"] == pytest.approx(4.0 / 3.0)
    assert by_method["fskd"]["within"] and by_method["fskd"]["tolerance"] == repro_check.SINGLE_RUN_TOLERANCE
    assert by_method["graft"]["runs_identical"] == 2 and by_method["graft"]["max_run_diff"] == pytest.approx(9.0)
    assert result["only_committed"] == [["cross", 1, "noise+subset"]]
    assert (result["rows_within"], result["rows_compared"]) == (2, 3)
    assert (result["runs_identical"], result["runs_compared"]) == (3, 7)


def test_cli_writes_json_and_markdown_and_fails_on_a_row_outside(tmp_path: Path) -> None:
    a = _report(_row("kd", 2, {(0, 0): 80.0, (1, 1): 82.0}, std=1.41))
    b = _report(_row("kd", 2, {(0, 0): 90.0, (1, 1): 92.0}, std=1.41))
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert repro_check.main([str(pa), str(pa), "--out", str(tmp_path / "same.json")]) == 0
    assert repro_check.main([str(pa), str(pb), "--out", str(tmp_path / "diff.json")]) == 1
    written = json.loads((tmp_path / "diff.json").read_text())
    assert written["rows"][0]["within"] is False and written["rows"][0]["diff"] == pytest.approx(10.0)
    assert {"command", "commit", "device"} <= written["facts"].keys()
    md = (tmp_path / "diff.md").read_text()
    assert "0/1 rows within" in md and "**no**" in md


def test_cli_names_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        repro_check.main([str(tmp_path / "nope.json"), str(tmp_path / "nope.json"), "--out", str(tmp_path / "o.json")])
    assert "nope.json does not exist" in capsys.readouterr().err


def test_chance_outside_std_matches_closed_forms_and_the_compare_expectation() -> None:
    # df = 2 (3 committed runs): P(|t| > b) = 1 - b / sqrt(2 + b^2), b = 1 / sqrt(1/3 + 1/3)
    assert repro_check.chance_outside_std(3, 3) == pytest.approx(1 - (3 / 7) ** 0.5, abs=1e-9)  # 34.53 %
    # df = 1 (2 committed runs): Cauchy, P(|t| > b) = 1 - 2/pi * atan(b), b = 1 / sqrt(1/2 + 1)
    import math

    assert repro_check.chance_outside_std(2, 1) == pytest.approx(1 - 2 / math.pi * math.atan(1 / 1.5 ** 0.5), abs=1e-9)
    # more runs on both sides: the std grows relatively wider than the mean's spread, so chance falls
    assert repro_check.chance_outside_std(10, 10) < repro_check.chance_outside_std(3, 3)
    with pytest.raises(ValueError, match="n_committed >= 2"):
        repro_check.chance_outside_std(1, 3)
    row = _row("kd", 1, {(0, 0): 80.0, (1, 1): 81.0, (2, 2): 82.0}, std=1.0)
    single = _row("fskd", 1, {(0, 0): 90.0}, std=0.0)
    result = repro_check.compare(_report(row, single), _report(row, single))
    assert result["rows_compared"] == 2
    assert result["expected_outside_by_chance"] == pytest.approx(1 - (3 / 7) ** 0.5)  # the n=1 row has no std
