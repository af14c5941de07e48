"""Result records carry a schema version; readers accept older records and refuse newer ones in one line."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from graftkd.errors import GraftkdError
from graftkd.records import RESULT_SCHEMA, SCHEMA_KEY, record_version

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def documented_fields() -> set[str]:
    """Every field named in the first column of docs/results.md's tables (`a`, `b` rows name several)."""
    fields = set()
    for line in DOCS.read_text().splitlines():
        if line.startswith("| `"):
            fields.update(re.findall(r"`([a-z_0-9]+)`", line.split("|")[1]))
    return fields


def test_every_record_starts_with_the_current_version() -> None:
    from graftkd.engine.runtime import run_facts

    facts = run_facts(torch.device("cpu"), 3)
    assert facts[SCHEMA_KEY] == RESULT_SCHEMA and facts["seed"] == 3
    assert set(facts) <= documented_fields()


def test_versions_up_to_this_one_are_read_and_newer_ones_refused(tmp_path) -> None:
    assert record_version({}, "old.json") == 0  # written before versioning
    assert record_version({SCHEMA_KEY: RESULT_SCHEMA}, "now.json") == RESULT_SCHEMA
    with pytest.raises(GraftkdError, match=r"new\.json was written by a newer graftkd .*upgrade graftkd"):
        record_version({SCHEMA_KEY: RESULT_SCHEMA + 1}, "new.json")
    with pytest.raises(GraftkdError, match="damaged"):
        record_version({SCHEMA_KEY: "1"}, "odd.json")


def test_report_and_skip_if_done_stop_on_a_newer_record(tmp_path, capsys) -> None:
    from graftkd.bench.cells import finished
    from graftkd.cli import main

    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({SCHEMA_KEY: RESULT_SCHEMA + 1, "kind": "distill"}))
    assert main(["report", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "newer graftkd" in err[0] and "result.json" in err[0]
    cell = tmp_path / "cell.json"
    cell.write_text(json.dumps({SCHEMA_KEY: RESULT_SCHEMA + 1, "status": "ok"}))
    with pytest.raises(GraftkdError, match="newer graftkd"):
        finished(cell)
    cell.write_text(json.dumps({"status": "ok"}))  # a committed cell from before versioning
    assert finished(cell)
