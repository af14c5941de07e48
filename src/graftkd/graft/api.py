"""One call from (teacher, student, few unlabeled images) to a merged student: ``graft(...)``."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from graftkd.engine.checkpoint import Checkpointer, fingerprint
from graftkd.engine.runtime import Timer, resolve_device, resolve_precision, seed_everything
from graftkd.errors import GraftkdError
from graftkd.schema import option
from graftkd.graft.blocks import BlockList
from graftkd.graft.plan import GraftPlan, InheritSpec, build_plan
from graftkd.graft.schedule import ScheduleConfig, StageSpec, batch_size_for, build_schedule
from graftkd.graft.train import EvalHook, GraftRunner


# How often to save or log does not change the result: a run may resume with other values for these.
_NOT_IN_FINGERPRINT = ("checkpoint_every_s", "log_every", "compile")  # grafting's own step is not compiled


@dataclass
class GraftConfig:
    """Everything that changes the result of a grafting run (and so keys its checkpoint)."""

    shots: int | None = None  # K, for the batch-size rule; None → images / classes
    batch_size: int | None = field(default=None, metadata=option(  # learning rates scaled by B/64
        "images per step (default: floor(64*K/10))"))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    inherit: InheritSpec = field(default="auto", metadata=option(
        "auto (the default), none, or block numbers 1,2,3 to copy from the teacher"))
    inherit_trainable: bool = field(default=False, metadata=option("train inherited blocks in network grafting"))
    augment: bool = field(default=True, metadata=option(  # random crop (zero padding) + flip, batched on the device
        "no random crops and flips of the few-shot images"))
    padding: int = field(default=4, metadata=option("crop padding (default: 4, digits 1)"))
    flip: bool = field(default=True, metadata=option("no horizontal flips (always off for digits)"))
    mixup: bool = field(default=False, metadata=option(  # the teacher sees the same blend
        "blend pairs of few-shot images (not in the paper)"))
    seed: int = 0
    precision: str = field(default="auto", metadata=option(  # bf16 autocast on CUDA, fp32 on CPU
        "auto (default): the loop times fp32/bf16 x memory formats on this machine and takes the fastest",
        words=("auto", "fp32", "bf16")))
    channels_last: bool | None = None  # None → on when the precision is bf16 (CUDA by default)
    # torch.compile in the one loop's plain step (kd-like methods); "off" here keeps library runs and grid
    # cells eager, as the committed grids ran; `graftkd distill` defaults to auto
    compile: str = field(default="off", metadata=option(
        "torch.compile the teacher and student of KD-like training: auto where the run is long enough to pay the "
        "compilation back (2,000 steps), on, or off (eager, as the committed grids ran)", words=("auto", "on", "off")))
    checkpoint_every_s: float = field(default=60.0, metadata=option(
        "checkpoint at the first epoch end after this many seconds (0 = every epoch)"))
    log_every: int = 10
    eval_every: int = 0  # epochs between optional evaluation-curve points; 0 = off (the default)
    # BatchNorm layers of trained blocks keep their running statistics and normalise with them, instead of
    # batch statistics of a few images (for blocks that start from trained weights, e.g. graft_fskd).
    freeze_norm_stats: bool = False

    def to_dict(self) -> dict:
        data = asdict(self)
        if not data["freeze_norm_stats"]:
            del data["freeze_norm_stats"]  # keeps the fingerprints of runs made before the option existed
        if not isinstance(data["inherit"], str):
            data["inherit"] = list(data["inherit"])
        return data


@dataclass
class GraftResult:
    student: nn.Module
    plan: GraftPlan
    blocks: list[dict]  # the plan as it was grafted (adapters included), for reports
    stages: list[StageSpec]
    records: list[dict]  # one per stage, as the one loop writes them
    batch_size: int
    shots: int
    merge_max_abs_diff: float
    seconds: float
    resumed: dict | None = None  # where a re-run picked the run up: {"stage", "epoch", "checkpoint"}

    def summary(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "shots": self.shots,
            "inherited_blocks": [i + 1 for i in self.plan.inherited],
            "blocks": self.blocks,
            "stages": [
                {**stage.to_dict(), **{k: v for k, v in rec.items() if k not in ("name", "kind", "epochs", "lr")}}
                for stage, rec in zip(self.stages, self.records)
            ],
            "merge_max_abs_diff": self.merge_max_abs_diff,
            "seconds": self.seconds,
            "resumed": self.resumed,
        }


def augmenter(config: GraftConfig):
    """The run's crop-and-flip as an ``(x, generator) -> x`` callable, or None when it would change nothing."""
    if not config.augment or (config.padding == 0 and not config.flip):
        return None
    from graftkd.data.augment import Augment

    return Augment(config.padding, config.flip)


def graft(
    teacher: nn.Module,
    student: nn.Module,
    images: torch.Tensor,
    *,
    normalize: nn.Module,
    config: GraftConfig | None = None,
    teacher_blocks: BlockList = None,
    student_blocks: BlockList = None,
    device: str | torch.device = "auto",
    run_dir: str | Path | None = None,
    progress: bool = True,
    eval_hook: EvalHook | None = None,
    init_adapters: Callable[[GraftPlan], None] | None = None,
) -> GraftResult:
    """Graft ``student`` into ``teacher`` on unlabeled uint8 ``images`` and return the merged student.

    The student is trained in place and finally *is* the plain student architecture (adapters folded).
    With ``run_dir`` the run checkpoints there and a repeated call resumes where it stopped.
    ``init_adapters`` replaces the adapters' He initialisation (it gets the plan before any step); it is
    not part of the checkpoint's fingerprint, so it must be the same on a resumed call.
    """
    config = config or GraftConfig()
    device = resolve_device(device)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise GraftkdError("few-shot images must be a uint8 tensor of shape (N, C, H, W)")
    if len(images) < 2:
        raise GraftkdError(f"grafting needs at least 2 images, got {len(images)}")
    generator = seed_everything(config.seed)  # before the plan, so adapter initialisation is seeded too
    timer = Timer(device)
    teacher.to(device).eval()
    student.to(device)
    plan = build_plan(
        teacher,
        student,
        images.shape[1:],
        teacher_blocks=teacher_blocks,
        student_blocks=student_blocks,
        inherit=config.inherit,
        inherit_trainable=config.inherit_trainable,
    )
    if init_adapters is not None:
        init_adapters(plan)
    num_classes = plan.teacher_out[-1].channels
    shots = config.shots or max(1, len(images) // num_classes)
    batch_size = config.batch_size or batch_size_for(shots, len(images))
    stages = build_schedule(plan, config.schedule, batch_size)
    # channels_last pays off with bf16 (1.45x per VGG16 grafting step on an AMX CPU, with fp32 it was 0.95x:
    # benchmarks/results/graft_speed-cpu.json), so by default it follows the precision.
    channels_last = (config.channels_last if config.channels_last is not None
                     else resolve_precision(device, config.precision) == "bf16")
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
        plan.scions.to(memory_format=torch.channels_last)
    run_fingerprint = fingerprint(
        {"config": {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_FINGERPRINT},
         "images": list(images.shape), "stages": [s.to_dict() for s in stages],
         "checksum": int(images[:, :, ::7, ::7].sum()), "state": "loop"}  # the one loop's checkpoint layout
    )
    runner = GraftRunner(
        plan,
        images,
        normalize=normalize,
        augment=augmenter(config),
        mixup=config.mixup,
        batch_size=batch_size,
        generator=generator,
        device=device,
        precision=config.precision,
        channels_last=channels_last,
        checkpointer=Checkpointer(run_dir, run_fingerprint, "graft"),
        checkpoint_every_s=config.checkpoint_every_s,
        log_every=config.log_every,
        eval_every=config.eval_every,
        eval_hook=eval_hook,
        progress=progress,
        freeze_norm_stats=config.freeze_norm_stats,
    )
    records = runner.run(stages)
    probe = normalize.to(device)(images[: min(len(images), 32)].to(device)).float()
    blocks = plan.describe()
    difference = plan.merge(probe)
    student.to(memory_format=torch.contiguous_format).eval()
    return GraftResult(student, plan, blocks, stages, records, batch_size, shots, difference, timer.elapsed(),
                       runner.resumed)
