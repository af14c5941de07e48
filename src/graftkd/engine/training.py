"""The one training loop: every gradient stage in graftkd (few-shot methods and grafting, full-data
distillation and its init stages, supervised teacher training) runs its epochs here.

What the loop owns: the epochs, the batches in order, summing each loss term on the device, host reads
only at log intervals (and the NaN guard there), the progress bar, when to checkpoint, and the stop
request (SIGINT/SIGTERM). What a caller owns, given as callables in :class:`StageRun`: what a batch is,
the forward and loss terms (``step``), the parameter update, and what an epoch end or a checkpoint
records. The loop never knows which method or which kind of training it runs.

Why one loop: resume, the NaN guard and interruption were written five times and had drifted apart
(one trainer could not resume, another crashed on a damaged checkpoint); here they are written once.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from graftkd.engine.signals import StopRequest
from graftkd.errors import GraftkdError


def _nothing(*_args: Any) -> None:
    return None


@dataclass
class StageRun:
    """One stage as the loop runs it.

    ``batches(epoch, first)`` yields the epoch's batches from step ``first`` on (0 unless a run resumes
    inside an epoch); it is consumed lazily, so random draws interleave with the steps exactly as in a
    hand-written loop. ``step(batch)`` returns the loss terms; their sum, less ``logged_only``, is the loss
    handed to ``update``. ``end_epoch(done, means)`` gets the mean terms since the last log read (None
    between log epochs). ``save(epoch, step, running)`` writes a checkpoint: ``epoch`` epochs done plus
    ``step`` steps of the next one, whose partial sums are ``running`` (empty at an epoch's end).
    ``interrupted(where)`` builds the exception raised after a stop request, once the state is saved.
    """

    name: str  # for messages: "stage 'block1' of 'graft'", "teacher training"
    epochs: int
    batches: Callable[[int, int], Iterable[Any]]
    step: Callable[[Any], dict[str, torch.Tensor]]
    update: Callable[[torch.Tensor], None]
    interrupted: Callable[[str], Exception]
    last_good: Callable[[], str]  # the checkpoint a re-run resumes from, for error messages
    save: Callable[[int, int, dict], None] = _nothing
    set_modes: Callable[[], None] = _nothing  # at the start of every epoch
    after_step: Callable[[Any], None] = _nothing
    end_epoch: Callable[[int, dict[str, float] | None], None] = _nothing
    logged_only: tuple[str, ...] = ()  # terms reported but not trained on (SAKD's agent loss)
    log_every: int = 1  # epochs between host reads of the running sums
    # when a checkpoint is written: "every-epoch" after each epoch (the last included); "timed" after an
    # epoch once checkpoint_every_s has passed since the last one (the last epoch excluded: the caller saves
    # the stage's end itself)
    save_after: Literal["every-epoch", "timed"] = "every-epoch"
    # inside an epoch: "save" checkpoints there every checkpoint_every_s and on a stop request (long epochs);
    # "discard" stops at once on a request, the epoch re-running from its start on resume (its order and
    # augmentation depend on (seed, epoch) alone); "no" looks at a stop request only at epoch ends
    mid_epoch: Literal["save", "discard", "no"] = "no"
    checkpoint_every_s: float = math.inf
    steps_per_epoch: int | None = None  # needed by mid_epoch="save" (the last step of an epoch is not saved mid-epoch)
    bar: Any = None  # a tqdm bar to advance, or None
    bar_per_step: bool = False  # advance it per step (else per epoch)
    steps_before: int = 0  # steps the stage took before this call (a resumed run), for messages


def run_stage(run: StageRun, *, first_epoch: int = 0, first_step: int = 0,
              running: dict[str, torch.Tensor] | None = None, counted: int = 0,
              stop: StopRequest | None = None) -> None:
    """Train ``run`` from epoch ``first_epoch``, step ``first_step`` (with the partial sums ``running`` over
    ``counted`` steps when resuming inside an epoch). ``stop``: a request shared with the caller (between
    stages); None: this stage listens for SIGINT/SIGTERM itself."""
    if stop is None:
        with StopRequest() as own:
            return _run(run, first_epoch, first_step, running, counted, own)
    return _run(run, first_epoch, first_step, running, counted, stop)


def _run(run: StageRun, first_epoch: int, first_step: int, running: dict[str, torch.Tensor] | None, counted: int,
         stop: StopRequest) -> None:
    running = dict(running or {})
    steps = run.steps_before
    last_save = time.perf_counter()
    for epoch in range(first_epoch, run.epochs):
        run.set_modes()
        start = first_step if epoch == first_epoch else 0
        for done, batch in enumerate(run.batches(epoch, start), start=start + 1):
            if run.mid_epoch == "discard" and stop.requested:
                raise run.interrupted(f"during epoch {epoch + 1}")
            terms = run.step(batch)
            run.update(sum(v for k, v in terms.items() if k not in run.logged_only))
            for key, value in terms.items():  # summed on the device: no host read per step
                running[key] = running.get(key, torch.zeros((), device=value.device)) + value.detach().float()
            counted += 1
            steps += 1
            run.after_step(batch)
            if run.bar is not None and run.bar_per_step:
                run.bar.update(1)
            if run.mid_epoch == "save" and done < (run.steps_per_epoch or 0):
                now = time.perf_counter()
                if stop.requested or now - last_save >= run.checkpoint_every_s:
                    run.save(epoch, done, {"running": running, "counted": counted})
                    last_save = now
                    if stop.requested:
                        raise run.interrupted(f"at epoch {epoch + 1}, step {done}/{run.steps_per_epoch}")
        completed = epoch + 1
        if run.bar is not None and not run.bar_per_step:
            run.bar.update(1)
        means = None
        if completed % max(1, run.log_every) == 0 or completed == run.epochs:
            means = {k: float(v) / max(1, counted) for k, v in running.items()}  # the host reads here only
            running, counted = {}, 0
            _guard(run, sum(means.values()), completed, steps)
        run.end_epoch(completed, means)
        last = completed == run.epochs
        now = time.perf_counter()
        if run.save_after == "every-epoch" or (not last and (stop.requested or now - last_save >= run.checkpoint_every_s)):
            if running:  # terms not yet read: keep the last good checkpoint as it is if they are not finite
                _guard(run, sum(float(v) for v in running.values()), completed, steps)
            run.save(completed, 0, {})
            last_save = now
        if stop.requested and not last:
            raise run.interrupted(f"after epoch {completed}")


def _guard(run: StageRun, value: float, epoch: int, steps: int) -> None:
    if not math.isfinite(value):
        raise GraftkdError(
            f"loss became {value} in {run.name} by epoch {epoch} (step {steps}); last good checkpoint: {run.last_good()}. "
            "Lower the learning rate or check the teacher and the inputs")
