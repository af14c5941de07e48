"""What the one training loop is given: the task (teacher, student, the few-shot images and the run's
settings) and the stages to train, as data. Every few-shot method receives the same task; the loop never
knows which method it runs."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

Augmenter = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class FewShotTask:
    """What every method receives; identical across methods within one grid cell."""

    teacher: nn.Module  # frozen, eval mode, on ``device``
    student: nn.Module  # a fresh zoo student on ``device`` (methods decide about inheriting teacher blocks)
    images: torch.Tensor  # uint8 (N, C, H, W) few-shot images, on ``device``; never any labels
    normalize: nn.Module  # uint8 -> normalised float, on ``device``
    device: torch.device
    generator: torch.Generator  # the only source of randomness for batches and augmentation
    batch_size: int
    epochs: int  # the budget: passes over the few-shot set (grafting's total across its stages)
    lr: float  # Adam learning rate for end-to-end methods, already scaled to ``batch_size``
    shots: int
    num_classes: int
    augment: Augmenter | None = None
    mixup: bool = False
    precision: str = "fp32"
    compile: str = "off"  # torch.compile of teacher and student in the loop's own step: off | on | auto (engine.compiled)
    inherit: Any = "auto"  # the grafting inheritance spec; methods that copy teacher blocks honour it
    teacher_arch: str = ""
    student_arch: str = ""
    run_dir: Path | None = None  # checkpoints go here (resumable); None: no checkpoints
    checkpoint_every_s: float = 60.0
    log_every: int = 10
    progress: bool = True
    # optional: accuracy of a forward function on held-out data, for curves (never for selection)
    eval_hook: Callable[[Callable[[torch.Tensor], torch.Tensor]], float] | None = None
    eval_every: int = 0
    schedule: Any = None  # graftkd.graft.ScheduleConfig, for methods that follow grafting's stages
    seed: int = 0
    padding: int = 4  # the augmentation's settings, for methods that build their own (grafting)
    flip: bool = True
    recipe: Any = None  # graftkd.engine.recipe.Recipe for the patient recipe; None: the paper's (epochs, Adam)
    channels_last: bool = False  # the loop's memory format (the patient recipe with precision "auto" times it)
    speed: dict | None = None  # what the timing of the candidate settings found, when it ran
    world: Any = None  # graftkd.engine.distributed.World under torchrun (the loop shards each batch); None: one process


@dataclass
class LossStage:
    """One stage of a gradient method, as data: how long, how fast, what trains."""

    name: str
    epochs: int
    lr: float
    modules: list[nn.Module]  # what the optimiser updates in this stage (student and/or extra modules)
    train_student: bool = True  # student in train mode (BN statistics update) during this stage
    kind: str = ""  # the stage's kind in its record ("block", "net"); empty: the method's name
    spec: Any = None  # the method's own description of the stage (grafting: its StageSpec)
