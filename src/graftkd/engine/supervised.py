"""Supervised training of a teacher: SGD Nesterov, one-cycle or cosine, label smoothing; resumable.

A checkpoint is written atomically after every epoch, holding the model, optimiser, scheduler and the
data generator, so an interrupted run re-started with the same command ends with the same weights.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from graftkd.engine.checkpoint import Checkpointer
from graftkd.engine.evaluate import evaluate_model
from graftkd.engine.runtime import autocast, resolve_precision, seed_everything
from graftkd.engine.signals import StopRequest
from graftkd.engine.training import StageRun, run_stage
from graftkd.errors import GraftkdError, Interrupted
from graftkd.schema import option


@dataclass
class TeacherRecipe:
    epochs: int = field(default=30, metadata=option("passes over the training set"))
    batch_size: int = field(default=128, metadata=option("images per step"))
    lr: float = field(default=0.1, metadata=option("peak SGD learning rate"))
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = field(default=5e-4, metadata=option("L2 weight decay"))
    label_smoothing: float = field(default=0.1, metadata=option("label smoothing of the cross-entropy"))
    schedule: str = field(default="onecycle", metadata=option("learning-rate schedule",
                                                              words=("onecycle", "cosine")))
    padding: int = field(default=4, metadata=option("random-crop padding in pixels"))
    flip: bool = field(default=True, metadata=option("no horizontal flips (e.g. digits, text)"))
    seed: int = 0
    precision: str = field(default="auto", metadata=option(
        "auto (default): bf16 autocast on CUDA and on CPUs with native bf16, else fp32", words=("auto", "fp32", "bf16")))
    channels_last: bool | None = None  # None: channels_last for image models (faster on CPU and GPU)

    def to_dict(self) -> dict:
        return asdict(self)


def _scheduler(optimizer: torch.optim.Optimizer, recipe: TeacherRecipe, steps_per_epoch: int):
    total = recipe.epochs * steps_per_epoch
    if recipe.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=max(1, total))
    if recipe.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(1, total))))
    raise GraftkdError(f"unknown schedule '{recipe.schedule}': use onecycle or cosine")


def train_supervised(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    normalize: nn.Module,
    recipe: TeacherRecipe,
    device: torch.device,
    checkpointer: Checkpointer | None = None,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = True,
    checkpoint_every_s: float = 300.0,
) -> dict:
    """Train ``model`` in place on uint8 ``images`` with integer ``labels``; return history and timings.

    A checkpoint is written at the end of every epoch and, inside an epoch, every ``checkpoint_every_s``
    seconds (0: after every step), so a killed run loses at most that much work; it holds the epoch's
    shuffling order and the generator state, which makes a resumed run bit-identical to an
    uninterrupted one on CPU.
    """
    from graftkd.data.augment import random_crop_flip

    if len(images) != len(labels):
        raise GraftkdError(f"{len(images)} images but {len(labels)} labels")
    if len(images) < recipe.batch_size:
        raise GraftkdError(
            f"{len(images)} training images is fewer than one batch of {recipe.batch_size}: lower --batch-size"
        )
    generator = seed_everything(recipe.seed)
    checkpointer = checkpointer or Checkpointer(None, "", "supervised")
    precision = resolve_precision(device, recipe.precision, cpu_bf16=True)
    channels_last = recipe.channels_last if recipe.channels_last is not None else images.dim() == 4
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    normalize = normalize.to(device)
    images, labels = images.to(device), labels.to(device)
    steps_per_epoch = len(images) // recipe.batch_size  # drop the last partial batch: constant BN batch size
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
        weight_decay=recipe.weight_decay,
    )
    scheduler = _scheduler(optimizer, recipe, steps_per_epoch)
    history: list[dict] = []
    start_epoch, start_step, running, counted = 0, 0, {}, 0
    plan = {"order": None, "spent": 0.0, "started": 0.0}  # the epoch's shuffled order and its time so far
    state = checkpointer.load()
    resumed_at = None
    if state is not None:
        resumed_at = {"epoch": int(state["epoch"]), "step": int(state.get("step", 0)),
                      "seconds_before": checkpointer.seconds_before}
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        history, start_epoch = list(state["history"]), int(state["epoch"])
        start_step = int(state.get("step", 0))
        if start_step:
            plan.update(order=state["order"].to(device), spent=float(state["epoch_seconds"]))
            saved = state["running"]  # one tensor in checkpoints written before the loss became a term
            running = {k: v.to(device) for k, v in saved.items()} if isinstance(saved, dict) else {"ce": saved.to(device)}
            counted = int(state.get("counted", start_step))

    def snapshot(epoch: int, step: int, partial: dict) -> None:
        mid = ({"order": plan["order"].cpu(), "running": {k: v.cpu() for k, v in partial["running"].items()},
                "counted": partial["counted"], "epoch_seconds": plan["spent"] + time.perf_counter() - plan["started"]}
               if step else {})
        checkpointer.save(
            {"epoch": epoch, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "generator": generator.get_state(), "history": history, **mid}
        )

    def set_modes() -> None:
        model.train()
        plan["started"] = time.perf_counter()

    def batches(_epoch: int, first: int):
        if plan["order"] is None:  # drawn when the epoch's first batch is, as the generator's next draw
            plan["order"] = torch.randperm(len(images), generator=generator).to(device)
            plan["spent"] = 0.0
        for step in range(first, steps_per_epoch):
            yield plan["order"][step * recipe.batch_size : (step + 1) * recipe.batch_size]

    def step(idx: torch.Tensor) -> dict[str, torch.Tensor]:
        x = random_crop_flip(images[idx], padding=recipe.padding, flip=recipe.flip, generator=generator)
        x = normalize(x).contiguous(memory_format=memory_format)
        with autocast(device, precision):
            return {"ce": F.cross_entropy(model(x).float(), labels[idx], label_smoothing=recipe.label_smoothing)}

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    def end_epoch(epoch: int, means: dict[str, float] | None) -> None:
        mean_loss = sum(means.values())
        seconds = plan["spent"] + time.perf_counter() - plan["started"]
        entry = {"epoch": epoch, "loss": mean_loss, "seconds": seconds,
                 "images_per_second": steps_per_epoch * recipe.batch_size / seconds,
                 "lr_end": optimizer.param_groups[0]["lr"]}
        history.append(entry)
        bar.set_postfix(epoch=epoch, loss=f"{mean_loss:.3f}", ips=f"{entry['images_per_second']:.0f}")
        if not progress:
            print(f"epoch {epoch}/{recipe.epochs}: loss {mean_loss:.4f}, "
                  f"{entry['images_per_second']:.0f} img/s, {seconds:.1f} s", flush=True)
        plan["order"] = None

    def interrupted(where: str) -> Interrupted:
        return Interrupted(f"stopped by {stop.signal_name} {where}; "
                           + (f"re-run the same command to resume from {checkpointer.path}" if checkpointer.path
                              else "nothing saved (no --out)"))

    total_steps = recipe.epochs * steps_per_epoch
    bar = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch + start_step, unit="step",
               disable=not progress, dynamic_ncols=True)
    try:
        with StopRequest() as stop:
            run_stage(StageRun(
                name="teacher training", epochs=recipe.epochs, batches=batches, step=step, update=update,
                interrupted=interrupted, last_good=checkpointer.last_good, save=snapshot, set_modes=set_modes,
                end_epoch=end_epoch, mid_epoch="save", checkpoint_every_s=checkpoint_every_s,
                steps_per_epoch=steps_per_epoch, bar=bar, bar_per_step=True,
                steps_before=start_epoch * steps_per_epoch + start_step),
                first_epoch=start_epoch, first_step=start_step, running=running, counted=counted, stop=stop)
    finally:
        bar.close()
    model.to(memory_format=torch.contiguous_format).eval()
    result = {"history": history, "seconds": sum(h["seconds"] for h in history), "precision": precision,
              "channels_last": channels_last, "resumed_at": resumed_at}
    if test is not None:
        result["test_acc"] = evaluate_model(model, test[0], test[1], normalize, device)
    return result
