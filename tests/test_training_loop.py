"""The one training loop (engine.training): sums, log reads, the loss it trains on, the NaN guard, stop
requests inside and between epochs, and resuming inside an epoch."""
from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from graftkd.engine.training import StageRun, run_stage
from graftkd.errors import GraftkdError, Interrupted

VALUES = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]  # the loss of each step, 3 steps an epoch


def _run(events: list, *, epochs: int = 2, values=VALUES, **options) -> StageRun:
    def batches(epoch: int, first: int):
        for i in range(first, 3):
            yield epoch * 3 + i

    def step(k: int) -> dict[str, torch.Tensor]:
        return {"a": torch.tensor(values[k]), "b": torch.tensor(1.0), "watch": torch.tensor(100.0)}

    fields = dict(
        name="stage 'x' of 'test'", epochs=epochs, batches=batches, step=step,
        update=lambda loss: events.append(("update", float(loss))),
        interrupted=lambda where: Interrupted(f"stopped {where}"), last_good=lambda: "ckpt.pt",
        save=lambda epoch, step, running: events.append(("save", epoch, step, {k: float(v) for k, v in
                                                                              running.get("running", {}).items()})),
        end_epoch=lambda done, means: events.append(("end", done, means)), logged_only=("watch",),
        steps_per_epoch=3)
    fields.update(options)
    return StageRun(**fields)


def test_the_loss_excludes_logged_terms_and_means_are_read_at_log_epochs_only() -> None:
    events: list = []
    run_stage(_run(events, epochs=3, values=VALUES + [64.0, 128.0, 256.0], log_every=2))
    updates = [e[1] for e in events if e[0] == "update"]
    assert updates == [v + 1.0 for v in VALUES + [64.0, 128.0, 256.0]]  # "watch" is not trained on
    ends = [e for e in events if e[0] == "end"]
    assert ends[0] == ("end", 1, None)  # not a log epoch: no host read
    assert ends[1][2] == {"a": sum(VALUES) / 6, "b": 1.0, "watch": 100.0}  # the mean over both epochs' steps
    assert ends[2][2] == {"a": (64 + 128 + 256) / 3, "b": 1.0, "watch": 100.0}  # the last epoch always reads
    assert [e[1:3] for e in events if e[0] == "save"] == [(1, 0), (2, 0), (3, 0)]  # every epoch by default


def test_a_loss_that_is_not_finite_names_the_stage_the_epoch_and_the_last_checkpoint() -> None:
    with pytest.raises(GraftkdError, match=r"loss became nan in stage 'x' of 'test' by epoch 1 \(step 3\); "
                                           r"last good checkpoint: ckpt\.pt"):
        run_stage(_run([], values=[1.0, math.nan, 1.0, 1.0, 1.0, 1.0]))


def _stop_at(step_index: int):
    """A step function wrapper that sends SIGINT to this process during step ``step_index``."""
    def wrap(step):
        def stepped(k: int):
            if k == step_index:
                os.kill(os.getpid(), signal.SIGINT)
            return step(k)
        return stepped
    return wrap


@pytest.mark.parametrize("mid_epoch, where, saves", [
    ("save", "at epoch 1, step 2/3", [(1 - 1, 2)]),  # saved inside the epoch, at the step it stopped after
    ("discard", "during epoch 1", []),  # nothing saved: the epoch re-runs from its start
    ("no", "after epoch 1", [(1, 0)]),  # the epoch finishes and is saved
])
def test_a_stop_request_inside_an_epoch(mid_epoch: str, where: str, saves: list) -> None:
    events: list = []
    run = _run(events, mid_epoch=mid_epoch)
    run.step = _stop_at(1)(run.step)
    with pytest.raises(Interrupted, match=f"stopped {where}"):
        run_stage(run)
    assert [e[1:3] for e in events if e[0] == "save"] == saves


def test_resuming_inside_an_epoch_gives_the_same_means_as_a_straight_run() -> None:
    straight: list = []
    run_stage(_run(straight))
    stopped: list = []
    run = _run(stopped, mid_epoch="save")
    run.step = _stop_at(4)(run.step)  # the second step of epoch 2
    with pytest.raises(Interrupted):
        run_stage(run)
    (_, epoch, step, running), = [e for e in stopped if e[0] == "save" and e[2]]
    assert (epoch, step) == (1, 2) and running == {"a": 8.0 + 16.0, "b": 2.0, "watch": 200.0}
    resumed: list = []
    run_stage(_run(resumed), first_epoch=epoch, first_step=step,
              running={k: torch.tensor(v) for k, v in running.items()}, counted=step)
    assert [e for e in resumed if e[0] == "end"] == [e for e in straight if e[0] == "end"][1:]
    assert [e for e in resumed if e[0] == "update"] == [e for e in straight if e[0] == "update"][5:]
