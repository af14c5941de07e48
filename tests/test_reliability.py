"""Bad inputs end in one clear line; a grafting run killed at random points resumes to identical weights."""
from __future__ import annotations

import functools
import os
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bad_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def _result(index: int) -> dict:
    return bad_inputs.run_case(bad_inputs.CASES[index])


@pytest.mark.parametrize("index", range(len(bad_inputs.CASES)), ids=[c.title for c in bad_inputs.CASES])
def test_bad_input_gets_one_clear_line(index: int) -> None:
    case, result = bad_inputs.CASES[index], _result(index)
    message = result["stderr"]
    assert result["code"] == 2, f"{case.title}: exit {result['code']}: {message}"
    assert message.startswith("graftkd: error: ") and "\n" not in message, message
    assert "Traceback" not in message
    for needle in case.must_mention:
        assert needle.lower() in message.lower(), f"{case.title}: {needle!r} not in: {message}"
    assert not result["code_ran"], "the crafted pickle ran its payload"


def test_docs_table_is_what_the_cli_prints_today() -> None:
    doc = (ROOT / "docs" / "reliability.md").read_text()
    start = doc.index(bad_inputs.MARK_BEGIN) + len(bad_inputs.MARK_BEGIN)
    committed = doc[start:doc.index(bad_inputs.MARK_END)].strip()
    current = bad_inputs.table([(case, _result(i)) for i, case in enumerate(bad_inputs.CASES)])
    assert committed == current, "docs/reliability.md is stale: python tests/bad_inputs.py --write docs/reliability.md"


def test_an_unexpected_exception_is_one_line_and_says_it_is_a_bug(monkeypatch, capsys) -> None:
    from graftkd import cli

    def broken(args) -> None:
        raise KeyError("boom")

    monkeypatch.setitem(cli.COMMANDS, "methods", broken)
    assert cli.main(["methods"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("graftkd: internal error: KeyError") and "--debug" in err and "\n" not in err


def test_a_reader_that_stops_early_is_not_an_error() -> None:
    """`graftkd methods | head -1`: the closed pipe ends the command quietly, as it would end `ls`."""
    with subprocess.Popen([sys.executable, "-m", "graftkd.cli", "methods"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=_env()) as child:
        child.stdout.close()  # the reader is gone before the first line is written
        err = child.stderr.read().decode()
        child.wait(timeout=120)
    assert child.returncode == 141 and err == "", err


# ------------------------------------------------------------------ SIGKILL at random points
def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def _distill(teacher: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "graftkd.cli", "distill", "--teacher", str(teacher), "--teacher-arch", "digits_cnn",
            "--student-arch", "digits_cnn_half", "--data", "digits", "--k", "2", "--preset", "digits",
            "--block-epochs", "25", "--net-epochs", "25", "--inherit", "none", "--init", "fresh", "--device", "cpu",
            "--no-progress",
            "--checkpoint-every-s", "0", "--out", str(out)]


def _distill_derived(teacher: Path, out: Path) -> list[str]:
    """A derived student refined by the patient recipe (chunks of 50 steps); ``--refine kd`` because the default
    resolver may find the repaired digits student close enough to leave it untrained, and fp32 because ``auto``
    times the memory formats, and on a busy machine two runs may find different ones fastest."""
    return [sys.executable, "-m", "graftkd.cli", "distill", "--teacher", str(teacher), "--teacher-arch", "digits_cnn",
            "--student-arch", "digits_cnn_half", "--data", "digits", "--k", "2", "--samples", str(64 * 600),
            "--refine", "kd", "--precision", "fp32",  # auto may time another memory format fastest in each run
            "--device", "cpu", "--no-progress", "--checkpoint-every-s", "0", "--out", str(out)]


def _student(out: Path) -> dict:
    state = torch.load(out / "student.pt", weights_only=True)
    return state.get("state_dict", state)


@pytest.mark.slow
@pytest.mark.parametrize("command", [_distill, _distill_derived], ids=["graft", "derived-patient"])
def test_sigkill_at_random_steps_then_resume_gives_identical_weights(tmp_path, command) -> None:
    from graftkd.models import build_model

    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    torch.save(build_model("digits_cnn", num_classes=10).state_dict(), teacher)

    straight = tmp_path / "straight"
    subprocess.run(command(teacher, straight), env=_env(), check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    checkpoint = killed / "checkpoint.pt"
    rng = random.Random()
    delays: list[float] = []
    kills = 0
    for _ in range(6):
        before = checkpoint.stat().st_mtime_ns if checkpoint.exists() else 0
        proc = subprocess.Popen(command(teacher, killed), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:  # wait until this process has saved once
            if checkpoint.exists() and checkpoint.stat().st_mtime_ns != before:
                break
            time.sleep(0.01)
        delay = rng.uniform(0.0, 0.5)
        time.sleep(delay)
        if proc.poll() is not None:
            break  # it finished before the kill landed
        proc.kill()
        proc.wait(timeout=60)
        delays.append(round(delay, 3))
        kills += 1
        if kills == 3:
            break
    assert kills >= 1, "the run finished before any kill: make it longer"
    done = subprocess.run(command(teacher, killed), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming " in done.stdout, done.stdout[-2000:]
    resumed = json.loads((killed / "result.json").read_text())["resumed"]
    assert resumed is not None and resumed["checkpoint"].endswith("checkpoint.pt"), resumed
    assert resumed["seconds_before"] > 0, resumed  # the killed processes' training time, up to their last save

    a, b = _student(straight), _student(killed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"after SIGKILLs at {delays} s past a checkpoint, {different} differ"


def test_a_checkpoint_carries_the_training_seconds_of_every_process_that_resumed_it(tmp_path) -> None:
    from graftkd.engine.checkpoint import Checkpointer

    first = Checkpointer(tmp_path, "f", "method:kd")
    assert first.load() is None and first.seconds_before == 0.0
    time.sleep(0.05)
    first.save({"epoch": 1})
    second = Checkpointer(tmp_path, "f", "method:kd")
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["seconds"]
    loaded = second.load()
    assert loaded["epoch"] == 1 and second.seconds_before == saved >= 0.05
    time.sleep(0.05)
    second.save({**loaded, "epoch": 2})  # the second process's time is added to the first's, not the old count kept
    third = Checkpointer(tmp_path, "f", "method:kd")
    assert third.load()["epoch"] == 2 and third.seconds_before >= saved + 0.05
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["seconds"]  # a checkpoint written before the count: unknown, and it stays unknown
    torch.save(state, tmp_path / "checkpoint.pt")
    fourth = Checkpointer(tmp_path, "f", "method:kd")
    assert fourth.load()["epoch"] == 2 and fourth.seconds_before is None and fourth.seconds() is None
    fourth.save({"epoch": 3})
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["seconds"] is None


def test_atomic_path_renames_on_success_and_keeps_the_old_file_on_failure(tmp_path) -> None:
    from graftkd.files import atomic_path, atomic_write_text

    target = atomic_write_text(tmp_path / "model.onnx", "old")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            tmp.write_text("half")
            raise RuntimeError("writer died")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
