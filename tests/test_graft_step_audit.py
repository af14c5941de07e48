"""A grafting step computes each teacher-prefix block once and never reads the model's tensors back."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from graftkd.data.augment import random_crop_flip
from graftkd.data.normalize import Normalizer
from graftkd.engine.audit import StepAudit, optimizer_step_counters
from graftkd.graft import ScheduleConfig, build_plan, build_schedule
from graftkd.graft.train import GraftRunner
from graftkd.models import build_model


def _runner(augment: bool) -> tuple[GraftRunner, list]:
    torch.manual_seed(0)
    teacher = build_model("vgg16_bn", num_classes=10).eval()
    student = build_model("vgg16_graft_bn", num_classes=10)
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    plan = build_plan(teacher, student, images.shape[1:], inherit="none")
    stages = build_schedule(plan, ScheduleConfig(preset="cifar10", block_epochs=1, net_epochs=1), batch_size=8)
    runner = GraftRunner(
        plan, images, normalize=Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), batch_size=8, generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"), progress=False,
        augment=(lambda x, g: random_crop_flip(x, padding=4, flip=True, generator=g)) if augment else None,
    )
    return runner, stages


def _audit_steps(runner: GraftRunner, stage, steps: int = 3) -> StepAudit:
    runner.set_modes(stage)
    optimizer = runner.make_optimizer(stage)
    prefix, replaced = runner.prefix_length(stage), set(stage.replaced)
    cached = runner.precompute(prefix) if runner.augment is None else None
    indices = torch.arange(8)
    runner.train_step(indices, prefix, replaced, optimizer, cached)  # creates Adam's state (step counters)
    modules = {f"teacher{i}": b for i, b in enumerate(runner.plan.teacher_blocks)}
    modules.update({f"scion{i}": runner.plan.scions[i] for i in stage.replaced})
    with StepAudit(modules, allowed=optimizer_step_counters(optimizer)) as audit:
        for _ in range(steps):
            runner.train_step(indices, prefix, replaced, optimizer, cached)
    return audit


@pytest.mark.parametrize("stage_index", [1, 3, 5])
def test_each_prefix_block_runs_once_per_step_and_suffix_blocks_twice(stage_index: int) -> None:
    runner, stages = _runner(augment=True)
    stage = stages[stage_index]
    audit = _audit_steps(runner, stage, steps=3)
    prefix = runner.prefix_length(stage)
    for i in range(runner.plan.num_blocks):
        calls = audit.calls[f"teacher{i}"]
        if i < prefix:
            assert calls == 3, f"teacher block {i + 1} (prefix) ran {calls} times in 3 steps"
        elif i in stage.replaced:
            assert calls == 3, f"teacher block {i + 1} ran {calls} times: only the target pass needs it"
            assert audit.calls[f"scion{i}"] == 3
        else:
            assert calls == 6, f"teacher block {i + 1} (suffix) ran {calls} times: target + grafted pass"


def test_cached_targets_skip_the_teacher_entirely_without_augmentation() -> None:
    runner, stages = _runner(augment=False)
    stage = stages[2]
    audit = _audit_steps(runner, stage, steps=2)
    prefix = runner.prefix_length(stage)
    assert all(audit.calls[f"teacher{i}"] == 0 for i in range(prefix))
    assert all(audit.calls[f"teacher{i}"] == 2 for i in range(prefix, runner.plan.num_blocks) if i not in stage.replaced)


def test_a_step_reads_nothing_back_from_the_model() -> None:
    runner, stages = _runner(augment=True)
    audit = _audit_steps(runner, stages[-1], steps=2)
    assert audit.syncs == {} and audit.model_reads == {}, (audit.syncs, audit.model_reads)


def test_the_audit_does_catch_a_read_back() -> None:
    model = nn.Linear(3, 2)
    with StepAudit({"linear": model}) as audit:
        loss = model(torch.ones(1, 3)).sum()
        float(loss.detach())
        (loss > 0).nonzero()
    assert audit.calls["linear"] == 1
    assert audit.model_reads["aten::_local_scalar_dense"] == 1 and audit.model_reads["aten::nonzero"] == 1


def test_readme_performance_table_matches_the_committed_benchmark() -> None:
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    path = root / "benchmarks" / "results" / "graft_speed-cpu.json"
    if not path.is_file():
        pytest.skip("no committed benchmark result")
    bench = json.loads(path.read_text())
    readme = (root / "README.md").read_text()
    assert bench["overhead_ratio_max"] <= 1.15
    assert bench["commit"][:7] in readme
    for row in bench["overhead"]:
        label = row["stage"].split(" (")[0] + (" (classifier)" if "classifier" in row["stage"] else "")
        line = next(l for l in readme.splitlines() if l.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"{row['median_ms']['step']:.0f} ms" and cells[3] == f"{row['overhead_ratio']:.2f}", line
