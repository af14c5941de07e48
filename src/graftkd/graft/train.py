"""Run a grafting schedule: stage 1 then stage 2, resumable, with the teacher prefix computed once.

Per step the work is the irreducible minimum: one forward of the frozen teacher prefix (shared by the
teacher target and the grafted net), one forward of the teacher suffix for the target, and one
forward/backward of the scions plus the teacher blocks after them. When augmentation is off, the prefix
outputs and the targets are constant, so they are computed once per stage for the whole few-shot set.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from graftkd.engine.checkpoint import Checkpointer
from graftkd.engine.loop import few_shot_batches, resume_note, few_shot_input
from graftkd.engine.runtime import Timer, autocast
from graftkd.engine.signals import StopRequest
from graftkd.errors import GraftkdError, Interrupted
from graftkd.graft.loss import normalized_logit_loss
from graftkd.graft.plan import GraftPlan
from graftkd.graft.schedule import StageSpec

Augmenter = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
EvalHook = Callable[[Callable[[torch.Tensor], torch.Tensor]], float]


class GraftInterrupted(Interrupted):
    """Raised after a SIGINT/SIGTERM once the state is saved, so the CLI can say how to resume."""


@dataclass
class StageRecord:
    name: str
    kind: str
    epochs: int
    lr: float
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    final_loss: float = float("nan")
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


class GraftRunner:
    """Executes StageSpecs on one plan and one few-shot image tensor."""

    def __init__(
        self,
        plan: GraftPlan,
        images: torch.Tensor,
        *,
        normalize: nn.Module,
        augment: Augmenter | None,
        mixup: bool = False,
        batch_size: int,
        generator: torch.Generator,
        device: torch.device,
        precision: str = "auto",
        channels_last: bool = False,
        checkpointer: Checkpointer | None = None,
        checkpoint_every_s: float = 60.0,
        log_every: int = 10,
        eval_every: int = 0,
        eval_hook: EvalHook | None = None,
        progress: bool = True,
        freeze_norm_stats: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise GraftkdError(f"few-shot images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        self.plan = plan
        self.freeze_norm_stats = freeze_norm_stats
        self.device = device
        self.images = images.to(device)
        self.normalize = normalize.to(device)
        self.augment = augment
        self.mixup = mixup
        self.batch_size = batch_size
        self.generator = generator
        self.precision = precision
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.checkpointer = checkpointer or Checkpointer(None, "", "graft")
        self.checkpoint_every_s = checkpoint_every_s
        self.log_every = max(1, log_every)
        self.eval_every = eval_every
        self.eval_hook = eval_hook
        self.progress = progress
        self.records: list[StageRecord] = []

    # ----------------------------------------------------------------- the hybrid network of a stage
    def prefix_length(self, stage: StageSpec) -> int:
        """Blocks before the first scion: identical in teacher and grafted net, so computed once per step."""
        return min(stage.replaced)

    def _run_from(self, x: torch.Tensor, start: int, replaced: set[int]) -> torch.Tensor:
        for index in range(start, self.plan.num_blocks):
            block = self.plan.scions[index] if index in replaced else self.plan.teacher_blocks[index]
            x = block(x)
        return x

    def hybrid_forward(self, stage: StageSpec) -> Callable[[torch.Tensor], torch.Tensor]:
        """T_l^B or T_l^N of ``stage`` as a function of normalised images (for evaluation curves)."""
        replaced = set(stage.replaced)
        return lambda x: self._run_from(x, 0, replaced)

    def _batch_input(self, indices: torch.Tensor) -> torch.Tensor:
        # Label-free mixup (optional): teacher and grafted net see the same blend of two few-shot images.
        return few_shot_input(self, indices).contiguous(memory_format=self.memory_format)

    def _teacher_pass(self, indices: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One teacher forward: the frozen prefix output (shared with the grafted net) and the target logits."""
        with torch.no_grad(), autocast(self.device, self.precision):
            features = self._batch_input(indices)
            for index in range(prefix):
                features = self.plan.teacher_blocks[index](features)
            return features, self._run_from(features, prefix, set()).float()

    def precompute(self, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix outputs and teacher targets for every image: valid only without augmentation or mixing."""
        chunks = [
            self._teacher_pass(torch.arange(start, min(start + 256, len(self.images)), device=self.device), prefix)
            for start in range(0, len(self.images), 256)
        ]
        return torch.cat([f for f, _ in chunks]), torch.cat([t for _, t in chunks])

    # ------------------------------------------------------------------------------ the loop
    def train_step(
        self,
        indices: torch.Tensor,
        prefix: int,
        replaced: set[int],
        optimizer: torch.optim.Optimizer,
        cached: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One optimisation step; returns the detached loss *on the device* (reading it is the caller's sync).

        Work: the teacher prefix once (shared by target and grafted net), the teacher suffix once for the
        target, the scions + teacher blocks after them forward and backward. With ``cached`` (no
        augmentation) the first two are table lookups.
        """
        if cached is not None:
            features, target = cached[0][indices], cached[1][indices]
        else:
            features, target = self._teacher_pass(indices, prefix)
        with autocast(self.device, self.precision):
            output = self._run_from(features, prefix, replaced)
        loss = normalized_logit_loss(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def make_optimizer(self, stage: StageSpec) -> torch.optim.Optimizer:
        """Adam as in the paper (betas 0.9/0.999, no weight decay) over the stage's trainable scions.

        When the stage gives adapters their own rate (the reference code's block stages), they form a
        second parameter group.
        """
        params = self._parameters(stage)
        if stage.adapter_lr is None:
            return torch.optim.Adam(params, lr=stage.lr, betas=(0.9, 0.999), weight_decay=0.0)
        adapter_ids = {id(p) for i in stage.trainable for part in (self.plan.scions[i].adapter_in,
                                                                   self.plan.scions[i].adapter_out)
                       for p in part.parameters()}
        groups = [{"params": [p for p in params if id(p) not in adapter_ids], "lr": stage.lr},
                  {"params": [p for p in params if id(p) in adapter_ids], "lr": stage.adapter_lr}]
        return torch.optim.Adam([g for g in groups if g["params"]], betas=(0.9, 0.999), weight_decay=0.0)

    def set_modes(self, stage: StageSpec) -> None:
        self.plan.teacher.eval()
        self.plan.scions.eval()
        for index in stage.trainable:  # inherited frozen blocks are never trainable: they stay in eval
            self.plan.scions[index].train()
            if self.freeze_norm_stats:  # normalise with the running statistics the block started with
                for module in self.plan.scions[index].modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()

    def _parameters(self, stage: StageSpec) -> list[nn.Parameter]:
        params = [p for i in stage.trainable for p in self.plan.scions[i].parameters() if p.requires_grad]
        if not params:
            raise GraftkdError(f"stage '{stage.name}' has nothing to train (all its blocks are frozen)")
        return params

    def _batches(self, count: int) -> list[torch.Tensor]:
        return few_shot_batches(count, self.batch_size, self.generator, self.device)

    resumed: dict | None = None

    def run(self, stages: list[StageSpec]) -> list[StageRecord]:
        state = self.checkpointer.load()
        start_stage, start_epoch = 0, 0
        if state is not None:
            self.plan.scions.load_state_dict(state["scions"])
            self.generator.set_state(state["generator"])
            start_stage, start_epoch = int(state["stage"]), int(state["epoch"])
            self.records = [StageRecord(**r) for r in state["records"]]
            self.resumed = resume_note(stages, start_stage, start_epoch, self.checkpointer.path)
        total_epochs = sum(s.epochs for s in stages)
        done_epochs = sum(s.epochs for s in stages[:start_stage]) + start_epoch
        bar = tqdm(total=total_epochs, initial=done_epochs, unit="ep", disable=not self.progress, dynamic_ncols=True)
        try:
            with StopRequest() as stop:
                for stage_index in range(start_stage, len(stages)):
                    resume = state if (state is not None and stage_index == start_stage) else None
                    self._run_stage(stage_index, stages[stage_index], resume, start_epoch if resume else 0, bar, stop)
                    state = None
                    if stop.requested and stage_index + 1 < len(stages):
                        raise self._interrupted(stop, f"after stage '{stages[stage_index].name}'")
        finally:
            bar.close()
        return self.records

    def _interrupted(self, stop: StopRequest, where: str) -> GraftInterrupted:
        saved = (
            f"state saved to {self.checkpointer.path}: re-run the same command to resume"
            if self.checkpointer.path
            else "no --out directory was given, so nothing was saved"
        )
        return GraftInterrupted(f"stopped by {stop.signal_name} {where}; {saved}")

    def _non_finite(self, value: float, stage: StageSpec, completed: int, record: StageRecord) -> GraftkdError:
        where = self.checkpointer.last_good()
        return GraftkdError(
            f"loss became {value} in stage '{stage.name}' by epoch {completed} (step {record.steps}); "
            f"last good checkpoint: {where}. Lower the learning rate or check the teacher and the inputs"
        )

    def _save(self, stage_index: int, epoch: int, optimizer: torch.optim.Optimizer | None) -> None:
        self.checkpointer.save(
            {
                "stage": stage_index,
                "epoch": epoch,
                "scions": self.plan.scions.state_dict(),
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "generator": self.generator.get_state(),
                "records": [vars(r) for r in self.records],
            }
        )

    def _run_stage(
        self,
        stage_index: int,
        stage: StageSpec,
        resume: dict | None,
        first_epoch: int,
        bar: tqdm,
        stop: StopRequest,
    ) -> None:
        optimizer = self.make_optimizer(stage)
        if resume is not None and resume.get("optimizer") is not None:
            optimizer.load_state_dict(resume["optimizer"])
            record = self.records[-1]
        else:
            record = StageRecord(stage.name, stage.kind, stage.epochs, stage.lr)
            self.records.append(record)
        replaced = set(stage.replaced)
        prefix = self.prefix_length(stage)
        cached = self.precompute(prefix) if self.augment is None and not self.mixup else None
        self.set_modes(stage)
        bar.set_description(stage.name)
        timer = Timer(self.device)
        base_seconds = record.seconds
        last_save = time.perf_counter()
        running = torch.zeros((), device=self.device)
        running_steps = 0
        for epoch in range(first_epoch, stage.epochs):
            for indices in self._batches(len(self.images)):
                running += self.train_step(indices, prefix, replaced, optimizer, cached)
                running_steps += 1
                record.steps += 1
                record.images += len(indices)
            completed = epoch + 1
            bar.update(1)
            if completed % self.log_every == 0 or completed == stage.epochs:
                mean_loss = float(running) / max(1, running_steps)  # the only host sync, at log intervals
                running.zero_()
                running_steps = 0
                if not math.isfinite(mean_loss):
                    raise self._non_finite(mean_loss, stage, completed, record)
                record.final_loss = mean_loss
                record.loss_curve.append((completed, mean_loss))
                seconds = base_seconds + timer.elapsed()
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{record.images / max(seconds, 1e-9):.0f}")
            if self.eval_hook is not None and self.eval_every and completed % self.eval_every == 0:
                self.plan.scions.eval()  # evaluation must not update BatchNorm statistics
                record.eval_curve.append((completed, self.eval_hook(self.hybrid_forward(stage))))
                self.set_modes(stage)
            if completed == stage.epochs:
                break
            now = time.perf_counter()
            if stop.requested or (self.checkpointer.path and now - last_save >= self.checkpoint_every_s):
                # never overwrite the last good checkpoint with weights a non-finite loss has touched
                if running_steps and not math.isfinite(float(running)):
                    raise self._non_finite(float(running), stage, completed, record)
                record.seconds = base_seconds + (now - timer.start)
                self._save(stage_index, completed, optimizer)
                last_save = now
            if stop.requested:
                raise self._interrupted(stop, f"stage '{stage.name}' after epoch {completed}")
        record.seconds = base_seconds + timer.elapsed()
        if not self.progress:  # one line per stage in logs (the bar shows the same live)
            tqdm.write(f"{stage.name}: {stage.epochs} epochs, loss {record.final_loss:.4f}, "
                       f"{record.images_per_second:.1f} img/s, {record.seconds:.1f} s")
        self._save(stage_index + 1, 0, None)
