"""Full-data distillation: 2 gloo processes equal 1 process; resume; the protocol's defaults."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from graftkd.distill.fulldata import KDRecipe, World, epoch_augmentation, epoch_indices

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(nproc: int, out: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29500 + nproc + os.getpid() % 1000), str(ROOT / "tests" / "ddp_worker.py"), str(out), *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path) -> None:
    _torchrun(1, tmp_path / "one.pt")
    _torchrun(2, tmp_path / "two.pt")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for key, value in one["state_dict"].items():
        # same data, order, augmentation and global batch; only float summation order differs
        assert torch.allclose(value, two["state_dict"][key], atol=1e-5, rtol=1e-4), key
    changed = torch.load(tmp_path / "one.pt")["loss"]
    assert len(changed) == 3


def test_process_shares_interleave_into_the_single_process_batches() -> None:
    single = epoch_indices(64, epoch=3, seed=5, world=World())
    r0 = epoch_indices(64, epoch=3, seed=5, world=World(rank=0, size=2))
    r1 = epoch_indices(64, epoch=3, seed=5, world=World(rank=1, size=2))
    for i in range(4):  # global batch 16 = 2 x local 8
        union = set(r0[i * 8:(i + 1) * 8].tolist()) | set(r1[i * 8:(i + 1) * 8].tolist())
        assert union == set(single[i * 16:(i + 1) * 16].tolist())
    a = epoch_augmentation(64, 3, KDRecipe(seed=5), torch.device("cpu"))
    b = epoch_augmentation(64, 3, KDRecipe(seed=5), torch.device("cpu"))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_protocol_defaults_and_small_lr_students() -> None:
    recipe = KDRecipe()
    assert (recipe.epochs, recipe.batch_size, recipe.milestones, recipe.temperature) == (240, 64, [150, 180, 210], 4.0)
    assert recipe.resolved_lr("resnet8x4") == 0.05
    assert recipe.resolved_lr("mobilenetv2") == recipe.resolved_lr("shufflev1") == 0.01
    assert "last epoch" in recipe.protocol("resnet8x4")


def _tiny_run(run_dir, monkeypatch=None, stop_after: int | None = None, stop_during: int | None = None,
              precision: str = "fp32", result: dict | None = None):
    import signal

    import graftkd.distill.fulldata as fulldata
    from graftkd.data.normalize import Normalizer

    sys.path.insert(0, str(ROOT / "tests"))
    from ddp_worker import tiny_net

    if stop_after is not None:
        original = fulldata._save
        calls = {"n": 0}

        def save_then_interrupt(checkpointer, state, *args):
            original(checkpointer, state, *args)
            calls["n"] += 1
            if state["epoch"] == stop_after and state["phase"] == 0 and args[2] is not None:
                os.kill(os.getpid(), signal.SIGINT)  # like Ctrl-C during the next epoch's first step

        monkeypatch.setattr(fulldata, "_save", save_then_interrupt)
    if stop_during is not None:
        batches = fulldata._batches

        def interrupt_after_first_batch(images, labels, epoch, *args):
            for i, batch in enumerate(batches(images, labels, epoch, *args)):
                if epoch + 1 == stop_during and i == 1:
                    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the epoch
                yield batch

        monkeypatch.setattr(fulldata, "_batches", interrupt_after_first_batch)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 4, (64,), generator=generator)
    student, teacher = tiny_net(6, 1), tiny_net(8, 2)
    recipe = KDRecipe(epochs=4, batch_size=16, lr=0.05, milestones=[2], precision=precision, eval_every=0, padding=1)
    out = fulldata.train_kd(student, teacher, (images, labels), normalize=Normalizer((0.5,) * 3, (0.25,) * 3),
                      recipe=recipe, device=torch.device("cpu"), run_dir=run_dir, progress=False)
    if result is not None:
        result.update(out)
    return student


def test_an_interrupted_run_resumes_to_identical_weights(tmp_path, monkeypatch) -> None:
    from graftkd.distill.fulldata import TrainInterrupted

    straight = _tiny_run(tmp_path / "a")
    with pytest.raises(TrainInterrupted, match="after epoch 2; .*re-run the same command"):
        _tiny_run(tmp_path / "b", monkeypatch, stop_after=2)
    monkeypatch.undo()
    resumed = _tiny_run(tmp_path / "b")
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key

    # one process stops within an epoch at once; the epoch restarts from its saved start on resume
    with pytest.raises(TrainInterrupted, match="during epoch 3 .*discarded.*re-run the same command"):
        _tiny_run(tmp_path / "c", monkeypatch, stop_during=3)
    assert torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)["epoch"] == 2
    monkeypatch.undo()
    resumed = _tiny_run(tmp_path / "c")
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


def test_precision_auto_times_the_full_data_step_records_it_and_resumes_in_its_setting(tmp_path, monkeypatch) -> None:
    """``precision: auto`` times the step in each candidate setting once per machine and pair (remembered), and
    records the choice; the probe leaves the run as it was; a checkpoint keeps the setting its run began with."""
    from graftkd.distill.fulldata import TrainInterrupted
    from graftkd.engine import loop

    monkeypatch.setattr(loop, "settings_path", lambda: tmp_path / "settings.json")
    timed: dict = {}
    _tiny_run(None, precision="auto", result=timed)
    speed = timed["speed"]
    assert {(r["precision"], r["channels_last"]) for r in speed["candidates"]} >= {("fp32", False), ("fp32", True)}
    assert all(r["images_per_second"] > 0 for r in speed["candidates"])
    assert speed["remembered"] == str(tmp_path / "settings.json") and timed["precision"] == speed["chosen"]["precision"]
    pinned: dict = {}
    fp32 = _tiny_run(None, result=pinned)
    assert pinned["speed"] is None

    def choose(channels_last: bool):  # the real probe runs, then the choice is forced
        monkeypatch.setattr(loop, "remember_setting", lambda key, measure: {
            **measure(), "chosen": {"precision": "fp32", "channels_last": channels_last}})

    choose(False)
    contiguous = _tiny_run(None, precision="auto")
    assert all(torch.equal(a, b) for a, b in zip(fp32.state_dict().values(), contiguous.state_dict().values()))
    choose(True)
    cl: dict = {}
    straight = _tiny_run(None, precision="auto", result=cl)
    assert cl["speed"]["chosen"]["channels_last"] is True
    assert all(v.is_contiguous() for v in straight.state_dict().values())  # handed back plain
    assert all(torch.allclose(a.float(), b.float(), atol=1e-3)
               for a, b in zip(fp32.state_dict().values(), straight.state_dict().values()))
    with pytest.raises(TrainInterrupted):
        _tiny_run(tmp_path / "r", monkeypatch, stop_after=2, precision="auto")
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)["speed"]["chosen"]["channels_last"]
    monkeypatch.undo()
    choose(False)  # the machine's remembered choice changed since: the resumed run keeps its own
    resumed_out: dict = {}
    resumed = _tiny_run(tmp_path / "r", precision="auto", result=resumed_out)
    assert resumed_out["speed"]["chosen"]["channels_last"] is True
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_a_limited_training_set_is_a_fixed_random_subset_not_the_first_classes() -> None:
    from graftkd.distill.fulldata import training_subset

    labels = torch.arange(10).repeat_interleave(100)  # stored class by class
    keep = training_subset(labels, 200)
    assert torch.equal(keep, training_subset(labels, 200)) and len(keep.unique()) == 200
    assert len(labels[keep].unique()) == 10


@pytest.mark.slow
def test_spot_adaptive_kd_under_two_gloo_processes_keeps_student_and_agent_in_step(tmp_path) -> None:
    _torchrun(2, tmp_path / "sakd.pt", "sakd")
    r0, r1 = torch.load(tmp_path / "sakd.rank0.pt"), torch.load(tmp_path / "sakd.rank1.pt")
    for part in ("student", "agent"):
        assert r0[part].keys() == r1[part].keys()
        for key in r0[part]:
            assert torch.allclose(r0[part][key], r1[part][key], atol=1e-6), (part, key)
    assert len(r0["policy"]) == 2 and r0["policy"] != r1["policy"]  # each process samples its own decisions


@pytest.mark.slow
def test_the_few_shot_loop_under_two_gloo_processes_equals_one_process(tmp_path) -> None:
    """`graftkd distill`'s loop under torchrun: each process trains on its share of the same global batch, so the
    weights equal one process's (BN-free model: per-process batch statistics would differ by design)."""
    _torchrun(1, tmp_path / "one.pt", "loop")
    _torchrun(2, tmp_path / "two.pt", "loop")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["images"] == two["images"] == 16 * 12  # the global batches
    assert one["process_images"] is None and two["process_images"] == 16 * 12 // 2  # each process: half of each
    for key, value in one["state_dict"].items():
        assert torch.allclose(value, two["state_dict"][key], atol=1e-5, rtol=1e-4), key


@pytest.mark.slow
def test_graftkd_distill_runs_under_torchrun_and_one_process_writes(tmp_path) -> None:
    from graftkd.models import build_model

    torch.manual_seed(0)
    teacher = tmp_path / "t.pt"
    torch.save(build_model("digits_cnn", num_classes=10).state_dict(), teacher)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29600 + os.getpid() % 1000), "-m", "graftkd.cli", "distill", "--teacher", str(teacher),
               "--teacher-arch", "digits_cnn", "--student-arch", "digits_cnn_half", "--data", "digits", "--k", "2",
               "--method", "kd", "--recipe", "patient", "--samples", "512", "--no-progress", "--out", str(tmp_path / "o")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert result["world_size"] == 2 and result["refine"]["stages"][0]["process_images"] == 256
    assert done.stdout.count("student weights:") == 1  # one report, from the first process
