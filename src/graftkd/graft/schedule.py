"""Multi-stage grafting described as data: a list of StageSpec built from a plan and a config.

Stage 1 (block grafting) trains each non-inherited scion alone inside the frozen teacher (Eq. 4).
Stage 2 (network grafting) grows a chain of scions l = 2..L and trains it together (Eq. 5); inherited
frozen blocks are identical to the teacher's, so they stay in the shared teacher prefix.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from graftkd.errors import GraftkdError
from graftkd.schema import option
from graftkd.graft.plan import GraftPlan

# Paper defaults (Implementation Details) at batch size 64; CIFAR-10 epochs as in the reference code.
PRESETS: dict[str, dict] = {
    "cifar10": {"block_lr": 2.5e-4, "net_lr": 1e-4, "block_epochs": [100, 60], "net_epochs": [100]},
    "cifar100": {"block_lr": 1e-3, "net_lr": 5e-5, "block_epochs": [1000, 200], "net_epochs": [150]},
    # Paper's ImageNet rates (block 1-2: 1e-4, 3-4: 1e-3; net 1~2: 1e-4, 1~3: 2e-3, 1~4: 1e-3); epochs are ours.
    "imagenet": {
        "block_lr": [1e-4, 1e-4, 1e-3, 1e-3],
        "net_lr": [1e-4, 2e-3, 1e-3],
        "block_epochs": [20],
        "net_epochs": [20],
    },
    # The embedded 8x8 digits demo: small nets, so larger steps and fewer epochs keep it under minutes.
    "digits": {"block_lr": 5e-3, "net_lr": 2e-3, "block_epochs": [100], "net_epochs": [150]},
}
# What the reference code runs on CIFAR-10 (utils/parser_cifar10.py, graft_net.py), where it departs from the
# paper's text: in block stages the adapters learn at 10x the block's rate (both scaled by K/10), and the
# network stages use a flat Adam 1e-4 whatever the batch size.
PRESETS["cifar10-reference"] = {**PRESETS["cifar10"], "block_adapter_lr_scale": 10.0, "net_lr_batch_scaled": False}
# Knobs a preset may leave out: adapters at the block's rate, every rate scaled by B/64 (the paper's text).
_DEFAULTS: dict[str, object] = {"block_adapter_lr_scale": 1.0, "net_lr_batch_scaled": True}


@dataclass(frozen=True)
class StageSpec:
    """One optimisation stage: which blocks are scions, which of them train, for how long, how fast."""

    name: str
    kind: str  # "block" or "net"
    replaced: tuple[int, ...]  # 0-based block indices running as scions
    trainable: tuple[int, ...]  # 0-based block indices whose scions are optimised
    epochs: int
    lr: float  # already scaled by batch_size / 64
    adapter_lr: float | None = None  # the scions' adapters' rate when it differs from ``lr``

    def to_dict(self) -> dict:
        record = asdict(self)
        if self.adapter_lr is None:
            del record["adapter_lr"]  # keeps fingerprints of runs made before adapters had their own rate
        return record


@dataclass
class ScheduleConfig:
    """Learning rates (at batch 64) and epochs; lists are per stage in order, the last entry repeating.

    ``block_adapter_lr_scale`` multiplies the rate of the adapters in block stages; ``net_lr_batch_scaled``
    says whether network-stage rates follow the B/64 rule. None takes the preset's value.
    """

    preset: str = field(default="cifar10", metadata=option(
        "learning-rate/epoch defaults: cifar10 (the default), cifar100, imagenet, digits, or cifar10-reference (the "
        "reference code's rates: adapters at 10x in block stages, network stages unscaled)",
        words=tuple(PRESETS)))
    block_lr: float | Sequence[float] | None = field(default=None, metadata=option(
        "learning rate(s) at batch 64 for block grafting (default: the preset's)"))
    net_lr: float | Sequence[float] | None = field(default=None, metadata=option(
        "learning rate(s) at batch 64 for network grafting (default: the preset's)"))
    block_epochs: int | Sequence[int] | None = field(default=None, metadata=option(
        "epochs per block stage, one value or a list (default: the preset's)"))
    net_epochs: int | Sequence[int] | None = field(default=None, metadata=option(
        "epochs per network stage, one value or a list (default: the preset's)"))
    block_adapter_lr_scale: float | None = None
    net_lr_batch_scaled: bool | None = None

    @classmethod
    def from_fields(cls, source) -> "ScheduleConfig":
        """The schedule named by ``source``'s attributes of the same names (a grid config, parsed command-line
        arguments); an attribute it lacks takes the preset's value."""
        from dataclasses import fields

        return cls(**{f.name: getattr(source, f.name) for f in fields(cls) if getattr(source, f.name, None) is not None})

    def resolved(self) -> dict:
        if self.preset not in PRESETS:
            raise GraftkdError(f"unknown preset '{self.preset}': choose one of {', '.join(PRESETS)}")
        values = {**_DEFAULTS, **PRESETS[self.preset]}
        for key in ("block_lr", "net_lr", "block_epochs", "net_epochs", "block_adapter_lr_scale", "net_lr_batch_scaled"):
            if getattr(self, key) is not None:
                values[key] = getattr(self, key)
        return values


def _pick(value: float | int | Sequence, index: int, what: str) -> float | int:
    """Per-stage value: a scalar applies everywhere; a list is indexed and its last entry repeats."""
    if isinstance(value, (int, float)):
        return value
    values = list(value)
    if not values:
        raise GraftkdError(f"{what} is an empty list: give a number or one per stage")
    return values[min(index, len(values) - 1)]


def batch_size_for(shots: int, total: int) -> int:
    """The paper's rule ⌊64·K/10⌋ (at least 1), capped at the number of images."""
    return max(1, min(total, (64 * shots) // 10))


def build_schedule(plan: GraftPlan, config: ScheduleConfig, batch_size: int) -> list[StageSpec]:
    values = config.resolved()
    scale = batch_size / 64.0
    adapter_scale = float(values["block_adapter_lr_scale"])
    if not adapter_scale > 0:
        raise GraftkdError(f"block_adapter_lr_scale is {adapter_scale}: it must be > 0 (1 = the block's own rate)")
    net_scale = scale if values["net_lr_batch_scaled"] else 1.0
    stages: list[StageSpec] = []
    for order, block in enumerate(plan.block_stage_blocks()):
        epochs = int(_pick(values["block_epochs"], order, "block_epochs"))
        lr = float(_pick(values["block_lr"], order, "block_lr")) * scale
        adapter_lr = lr * adapter_scale if adapter_scale != 1.0 else None
        stages.append(StageSpec(f"block {block + 1} ({plan.names[block]})", "block", (block,), (block,), epochs, lr,
                                adapter_lr))

    grafted = plan.grafted_blocks()
    first = plan.block_stage_blocks()[0] if plan.block_stage_blocks() else None
    for order, last in enumerate(b for b in grafted if first is not None and b > first):
        chain = tuple(b for b in grafted if b <= last)
        epochs = int(_pick(values["net_epochs"], order, "net_epochs"))
        lr = float(_pick(values["net_lr"], order, "net_lr")) * net_scale
        label = f"net {chain[0] + 1}-{last + 1}"
        stages.append(StageSpec(label, "net", chain, chain, epochs, lr))
    for stage in stages:
        if stage.epochs < 0:
            raise GraftkdError(f"stage '{stage.name}' has {stage.epochs} epochs: epochs must be >= 0")
        if not stage.lr > 0:
            raise GraftkdError(f"stage '{stage.name}' has learning rate {stage.lr}: it must be > 0")
    return stages


def paper_budget(teacher, student, input_shape: tuple[int, ...], config: ScheduleConfig, batch_size: int,
                 inherit="auto", baseline_lr: float | None = None) -> tuple[int, float]:
    """The budget every method of a few-shot cell gets: the grafting schedule's total epochs for this pair and
    a learning rate (``baseline_lr``, else the first block rate) scaled to ``batch_size``.

    The plan is built on copies: planning wraps the blocks, and the caller's models must stay as they are."""
    import copy

    from graftkd.graft.plan import build_plan

    plan = build_plan(copy.deepcopy(teacher), copy.deepcopy(student), tuple(input_shape), inherit=inherit)
    epochs = sum(s.epochs for s in build_schedule(plan, config, batch_size))
    rate = baseline_lr if baseline_lr is not None else config.resolved()["block_lr"]
    rate = rate[0] if isinstance(rate, (list, tuple)) else rate
    return epochs, float(rate) * batch_size / 64
