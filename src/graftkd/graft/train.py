"""Grafting's own part of training: the hybrid networks, the shared teacher pass, the precompute, the step.

The stages run in the one training loop (:mod:`graftkd.engine.loop`), which owns batches, optimiser
steps, the NaN guard, records, progress, checkpoints and resume, as for every other method.

Per step the work is the irreducible minimum: one forward of the frozen teacher prefix (shared by the
teacher target and the grafted net), one forward of the teacher suffix for the target, and one
forward/backward of the scions plus the teacher blocks after them. When augmentation is off, the prefix
outputs and the targets are constant, so they are computed once per stage for the whole few-shot set.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from graftkd.engine.checkpoint import Checkpointer
from graftkd.data.batcher import FewShotBatcher
from graftkd.engine.loop import run_loss_method
from graftkd.engine.runtime import autocast
from graftkd.engine.task import FewShotTask, LossStage
from graftkd.errors import GraftkdError
from graftkd.graft.loss import normalized_logit_loss
from graftkd.graft.plan import GraftPlan
from graftkd.graft.schedule import StageSpec

Augmenter = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
EvalHook = Callable[[Callable[[torch.Tensor], torch.Tensor]], float]


def _spec(stage: StageSpec | LossStage) -> StageSpec:
    """The StageSpec behind a loop stage (the loop hands its hooks the LossStage it was given)."""
    return stage.spec if isinstance(stage, LossStage) else stage


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
        self.batcher = FewShotBatcher(self.images, self.normalize, generator, device, augment=augment,
                                      pair_mixup=mixup, channels_last=channels_last)
        self.checkpointer = checkpointer or Checkpointer(None, "", "graft")
        self.checkpoint_every_s = checkpoint_every_s
        self.log_every = max(1, log_every)
        self.eval_every = eval_every
        self.eval_hook = eval_hook
        self.progress = progress
        self.records: list[dict] = []
        self._cache: tuple[str, tuple[torch.Tensor, torch.Tensor] | None] | None = None

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
        return self.batcher.view(indices)

    def _teacher_pass(self, indices: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One teacher forward: the frozen prefix output (shared with the grafted net) and the target logits."""
        return self._teacher_pass_on(self._batch_input(indices), prefix)

    def _teacher_pass_on(self, x: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), autocast(self.device, self.precision):
            features = x
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

    # ------------------------------------------- one step on its own (the speed benchmark and the step audit)
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
        batch = (cached[0][indices], cached[1][indices]) if cached is not None else self._batch_input(indices)
        loss = self._loss(batch, prefix, replaced)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def _loss(self, batch, prefix: int, replaced: set[int]) -> torch.Tensor:
        """The grafting loss of one batch: normalised images, or (prefix output, target) from the precompute."""
        features, target = batch if isinstance(batch, tuple) else self._teacher_pass_on(batch, prefix)
        with autocast(self.device, self.precision):
            output = self._run_from(features, prefix, replaced)
        return normalized_logit_loss(output, target)

    def make_optimizer(self, stage: StageSpec | LossStage, params=None) -> torch.optim.Optimizer:
        """Adam as in the paper (betas 0.9/0.999, no weight decay) over the stage's trainable scions.

        When the stage gives adapters their own rate (the reference code's block stages), they form a
        second parameter group.
        """
        stage = _spec(stage)
        params = self._parameters(stage)
        if stage.adapter_lr is None:
            return torch.optim.Adam(params, lr=stage.lr, betas=(0.9, 0.999), weight_decay=0.0)
        adapter_ids = {id(p) for i in stage.trainable for part in (self.plan.scions[i].adapter_in,
                                                                   self.plan.scions[i].adapter_out)
                       for p in part.parameters()}
        groups = [{"params": [p for p in params if id(p) not in adapter_ids], "lr": stage.lr},
                  {"params": [p for p in params if id(p) in adapter_ids], "lr": stage.adapter_lr}]
        return torch.optim.Adam([g for g in groups if g["params"]], betas=(0.9, 0.999), weight_decay=0.0)

    def set_modes(self, stage: StageSpec | LossStage) -> None:
        stage = _spec(stage)
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

    # --------------------------------------------------- what the one loop asks of grafting
    name = "graft"
    resumed: dict | None = None

    def describe(self) -> dict:
        return {"method": self.name}

    def setup(self, task: FewShotTask) -> None:
        pass

    def extra_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict()  # the scions (student blocks and adapters) are the task's student

    def stages(self, task: FewShotTask) -> list[LossStage]:
        return [LossStage(s.name, s.epochs, s.lr, [self.plan.scions[i] for i in s.trainable], kind=s.kind, spec=s)
                for s in self._specs]

    def teacher_paths(self, stage: LossStage) -> list[str]:
        return []

    student_paths = teacher_paths

    def batch_input(self, stage: LossStage, indices: torch.Tensor):
        """The step's batch: (prefix output, target) looked up in the stage's precompute when the inputs are
        constant (no augmentation, no mixing), else the augmented, normalised images."""
        spec = stage.spec
        if self._cache is None or self._cache[0] != spec.name:
            constant = self.augment is None and not self.mixup
            self._cache = (spec.name, self.precompute(self.prefix_length(spec)) if constant else None)
        cached = self._cache[1]
        return (cached[0][indices], cached[1][indices]) if cached is not None else self._batch_input(indices)

    def step_terms(self, stage: LossStage, batch) -> dict[str, torch.Tensor]:
        spec = stage.spec
        return {"loss": self._loss(batch, self.prefix_length(spec), set(spec.replaced))}

    def eval_forward(self, stage: LossStage) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.hybrid_forward(stage.spec)

    def run(self, stages: list[StageSpec]) -> list[dict]:
        """Train ``stages`` in order in the one loop (resumable); returns one record per stage."""
        self._specs, self._cache = list(stages), None
        num_classes = self.plan.teacher_out[-1].channels
        task = FewShotTask(
            teacher=self.plan.teacher, student=self.plan.scions, images=self.images, normalize=self.normalize,
            device=self.device, generator=self.generator, batch_size=self.batch_size,
            epochs=sum(s.epochs for s in stages), lr=stages[0].lr if stages else 0.0,
            shots=max(1, len(self.images) // num_classes), num_classes=num_classes, augment=self.augment,
            mixup=self.mixup, precision=self.precision, checkpoint_every_s=self.checkpoint_every_s,
            log_every=self.log_every, progress=self.progress, eval_hook=self.eval_hook, eval_every=self.eval_every,
            run_dir=self.checkpointer.run_dir)
        outcome = run_loss_method(self, task, self.checkpointer, empty_ok=True)
        self.records, self.resumed = outcome.stages, outcome.extra["resumed"]
        return self.records
