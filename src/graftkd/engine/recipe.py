"""Training recipes for the shared loop: ``paper`` (today's: epochs over the few-shot set, constant Adam rate)
and ``patient`` (a sample budget of fixed-size batches built from repeated images, mixed views that teacher
and student see identically, warm-up then cosine to zero, BatchNorm recalibrated on un-mixed views at the end).

A recipe is data: it is recorded in ``result.json`` and keys the checkpoint, so a resumed run cannot mix two.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from graftkd.errors import GraftkdError
from graftkd.schema import option

RECIPES = ("paper", "patient")
#: the patient recipe's budget when nothing chose another: 83.8 against 74.4 % at 32k on the validation split
#: (ResNet-56 -> derived ResNet-20, K=10), about 6 min on 2 CPU cores in bf16 (results/cifar10-derived/dev)
DEFAULT_SAMPLES = 256_000
MIXES = ("none", "mixup", "cutmix", "mixup+cutmix")
CROPS = ("pad", "resized")


@dataclass(frozen=True)
class Recipe:
    name: str = "patient"
    # images seen in training (the schedule's unit); None: DEFAULT_SAMPLES, or the path's own choice (the derived
    # default path with synthetic images: graftkd.refine.SYNTH_BUDGET or WIDTH_SYNTH_BUDGET), recorded as the number
    # it became
    samples: int | None = field(default=None, metadata=option(
        "the patient recipe (derived students with --refine kd, or --recipe patient): training budget in images "
        "seen, batches of 64 (default: 256000; on the derived default path with synthetic images 128000 when units "
        "were chosen, 64000 when channels were)"))
    batch_size: int = 64  # fixed whatever K: batches repeat images, each copy with its own augmentation
    steps_per_chunk: int = 50  # checkpoint / log granularity (a chunk plays the role of an epoch)
    optimizer: str = "sgd"
    lr: float = field(default=0.01, metadata=option("the patient recipe: peak SGD rate",
                                                    flag="--refine-lr"))
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps with a linear warm-up
    mix: str = "mixup+cutmix"  # per batch: mixup or CutMix with equal chance (Beta(alpha, alpha) weights)
    alpha: float = 1.0
    mix_per_sample: bool = False  # True: each image of a batch draws its own partner, weight and mix kind
    jitter: float = 0.0  # > 0: photometric jitter, brightness / contrast / saturation factors in 1 +- jitter
    crop: str = "pad"  # pad: the run's padded crop and flip; resized: a random box of crop_scale..1 of the area
    crop_scale: float = 0.35
    # > 0: each mixed batch takes one signed-gradient step of this size (normalised units) up the
    # student-teacher KL before the step trains on it, so training explores where the two disagree
    adversarial: float = 0.0
    # False: BatchNorm normalises with batch statistics while training (75.5 vs 61.2 % on the validation split,
    # ResNet-56 -> derived ResNet-20, K=10, 32k samples: results/cifar10-derived/dev)
    freeze_bn: bool = False
    # > 0: the student handed back is an exponential moving average of its weights with this decay per step
    # (bias-corrected early on: min(ema, (1 + t) / (10 + t))); BatchNorm statistics are then recalibrated
    ema: float = field(default=0.0, metadata=option(
        "the patient recipe: return an exponential moving average of the weights with this decay per step, e.g. "
        "0.999 (0: off)", metavar="DECAY"))
    # > 0: L2-SP, a pull of the weights towards the run's starting point (the derived student): this strength
    # times (w - w_start) is added to each gradient, as the loss term strength / 2 * ||w - w_start||^2 would
    anchor: float = 0.0
    # > 0: this many more training images, made before the first step from mixed few-shot views and the teacher's
    # BatchNorm statistics (graftkd.engine.inversion); None: the derived students' default path chooses
    # (graftkd.refine.resolve_refinement), every other path takes 0
    synth: int | None = field(default=None, metadata=option(
        "the patient recipe: add N images synthesised from the few-shot images and the teacher's BatchNorm "
        "statistics to the training views (0: none; default: chosen on the derived default path, else 0)",
        metavar="N"))
    synth_steps: int = field(default=100, metadata=option(
        "the patient recipe with --synth: optimisation steps per batch of synthetic images", metavar="STEPS"))
    # False: make the synthetic images even when an earlier run with the same teacher, images, settings and machine
    # left them in the cache. Either way they are the same images, so this is not part of the recipe's record
    synth_cache: bool = field(default=True, metadata=option(
        "the patient recipe with --synth: make the synthetic images again instead of reading the ones an earlier run "
        "with the same teacher, images, settings and machine left in $GRAFTKD_CACHE/synthetic", flag="--no-synth-cache"))
    recalibrate_bn: bool = True  # re-estimate BatchNorm statistics at the end, on un-mixed augmented views
    recalibrate_views: int = 8
    clip_grad: float = 10.0  # gradient-norm clip: a derived start far from the teacher must not blow up

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise GraftkdError(f"unknown recipe '{self.name}': use one of {', '.join(RECIPES)}")
        if self.mix not in MIXES:
            raise GraftkdError(f"unknown mix '{self.mix}': use one of {', '.join(MIXES)}")
        if self.crop not in CROPS:
            raise GraftkdError(f"unknown crop '{self.crop}': use one of {', '.join(CROPS)}")
        if not 0.0 < self.crop_scale <= 1.0:
            raise GraftkdError(f"crop_scale must be in (0, 1] (got {self.crop_scale})")
        if not 0.0 <= self.jitter < 1.0:
            raise GraftkdError(f"jitter must be in [0, 1) (got {self.jitter}); 0 turns it off")
        if self.adversarial < 0:
            raise GraftkdError(f"adversarial step must be >= 0 (got {self.adversarial})")
        if not 0.0 <= self.ema < 1.0:
            raise GraftkdError(f"ema decay must be in [0, 1) (got {self.ema}); 0 turns it off")
        if self.anchor < 0:
            raise GraftkdError(f"anchor strength must be >= 0 (got {self.anchor}); 0 turns it off")
        if self.optimizer not in ("sgd", "adam"):
            raise GraftkdError(f"unknown optimizer '{self.optimizer}': use sgd or adam")
        if self.synth is not None and (self.synth < 0 or self.synth == 1):
            raise GraftkdError(f"synth must be 0 or at least 2 images (got {self.synth}): BatchNorm statistics need a batch")
        if self.synth_steps < 1:
            raise GraftkdError(f"synth_steps must be >= 1 (got {self.synth_steps})")
        if self.budget < self.batch_size:
            raise GraftkdError(f"a budget of {self.budget} samples is less than one batch of {self.batch_size}: "
                               "raise --samples")

    @property
    def budget(self) -> int:
        """The sample budget: ``samples``, or ``DEFAULT_SAMPLES`` when no one chose it."""
        return DEFAULT_SAMPLES if self.samples is None else self.samples

    @property
    def steps(self) -> int:
        """Optimiser steps: whole batches, the last one smaller when the budget is not a multiple of a batch."""
        return math.ceil(self.budget / self.batch_size)

    @property
    def chunks(self) -> int:
        return max(1, math.ceil(self.steps / self.steps_per_chunk))

    def stage_budget(self, before: int, epochs: int, total_epochs: int) -> tuple[int, int]:
        """A stage's share of the sample budget, as (images, steps): its epochs over all stages' (the whole
        budget for one stage). Shares are cut at rounded cumulative points, so they add up to ``samples``
        exactly; ``before`` is the epochs of the stages ahead of it."""
        total = max(1, total_epochs)
        images = round(self.budget * (before + epochs) / total) - round(self.budget * before / total)
        images = max(1, images)
        return images, math.ceil(images / self.batch_size)

    def lr_factor(self, step: int, total: int | None = None) -> float:
        """Linear warm-up over ``warmup`` of the ``total`` steps (default: the whole budget), then cosine to
        zero at the last step."""
        total = self.steps if total is None else total
        warm = max(1, int(round(self.warmup * total))) if self.warmup > 0 else 0
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def to_dict(self) -> dict:
        record = {**asdict(self), "samples": self.budget}
        del record["synth_cache"]  # where the images come from, not what they are: the synth record says which
        return record


class StartAnchor:
    """The module's floating-point parameters as they were when built (L2-SP's reference point), and the pull
    towards them that :meth:`pull` adds to the gradients."""

    def __init__(self, module: torch.nn.Module, strength: float) -> None:
        self.strength = strength
        self.params = [p for p in module.parameters() if p.dtype.is_floating_point]
        self.start = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def pull(self) -> None:
        pairs = [(p, s) for p, s in zip(self.params, self.start) if p.grad is not None]
        if pairs:
            params, start = zip(*pairs)
            torch._foreach_add_([p.grad for p in params], torch._foreach_sub(list(params), list(start)),
                                alpha=self.strength)


class WeightAverage:
    """An exponential moving average of a module's floating-point parameters, kept beside it."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = [p for p in module.parameters() if p.dtype.is_floating_point]
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)
        self.updates += 1

    @torch.no_grad()
    def copy_to_module(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)

    def state_dict(self) -> dict:
        return {"shadow": [s.clone() for s in self.shadow], "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)
        self.updates = int(state["updates"])
