"""The grafting core: loss golden values, plan checks, exact merge, schedule, resume determinism."""
from __future__ import annotations

import signal

import pytest
import torch
from torch import nn

from graftkd.errors import GraftkdError
from graftkd.graft import GraftConfig, ScheduleConfig, build_plan, build_schedule, graft, normalized_logit_loss
from graftkd.models import build_model
from graftkd.models.profile import count_params


# ------------------------------------------------------------------ a custom pair, outside the zoo
class CustomNet(nn.Module):
    """A user's own model: attributes and a forward with functional glue is *not* allowed between
    blocks, so glue lives inside the head block."""

    def __init__(self, width: int, num_classes: int = 10, stride: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=stride, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU()
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


class ScaledNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 127.5 - 1.0


PATHS = ["stem", "body", "head"]


def _images(n: int = 40, channels: int = 1, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)


def _quick_config(**kw) -> GraftConfig:
    schedule = ScheduleConfig(preset="digits", block_epochs=2, net_epochs=2)
    return GraftConfig(schedule=schedule, shots=4, padding=1, log_every=1, **kw)


# ------------------------------------------------------------------------------------- the loss
def test_loss_golden_values():
    s = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    t = torch.tensor([[4.0, 3.0], [2.0, 0.0]])
    # row 1: (0.6, 0.8) vs (0.8, 0.6) → 0.08; row 2: identical directions → 0; mean = 0.04
    assert normalized_logit_loss(s, t).item() == pytest.approx(0.04, abs=1e-7)
    # scale invariance: the loss ignores logit magnitudes
    assert normalized_logit_loss(10 * s, 0.1 * t).item() == pytest.approx(0.04, abs=1e-6)
    # opposite directions reach the maximum 4
    assert normalized_logit_loss(s[:1], -s[:1]).item() == pytest.approx(4.0)


@pytest.mark.parametrize("freeze", [False, True])
def test_freeze_norm_stats_keeps_the_running_statistics_and_still_trains(freeze):
    torch.manual_seed(0)
    teacher, student = CustomNet(16), CustomNet(6)
    norms = [m for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    weights = [m.weight.clone() for m in norms]
    config = _quick_config(freeze_norm_stats=freeze)
    graft(teacher, student, _images(), normalize=ScaledNorm(), config=config, teacher_blocks=PATHS,
          student_blocks=PATHS, device="cpu", progress=False)
    kept = [torch.equal(m.running_var, var) for m, (_, var) in zip(norms, stats)]
    assert kept == [freeze] * len(norms)  # the adapter fold changes weights, never running statistics
    assert all(not torch.equal(m.weight, w) for m, w in zip(norms, weights))  # BN affine params still learn
    assert ("freeze_norm_stats" in config.to_dict()) == freeze  # old runs' fingerprints are unchanged


# ----------------------------------------------------------------------- custom pair via paths
def test_custom_pair_grafts_through_the_api_with_a_block_list():
    torch.manual_seed(0)
    teacher, student = CustomNet(16), CustomNet(6)
    result = graft(
        teacher, student, _images(), normalize=ScaledNorm(), config=_quick_config(),
        teacher_blocks=PATHS, student_blocks=PATHS, device="cpu", progress=False,
    )
    rows = {r["name"]: r for r in result.blocks}
    assert rows["stem"]["adapter_out"] == "6->16" and rows["body"]["adapter_in"] == "16->6"
    assert rows["body"]["adapter_out"] == "12->32" and rows["head"]["adapter_in"] == "32->12"
    assert rows["stem"]["adapter_in"] == "-" and rows["head"]["adapter_out"] == "-"
    assert [s.name for s in result.stages] == [
        "block 1 (stem)", "block 2 (body)", "block 3 (head)", "net 1-2", "net 1-3"
    ]
    assert all(r["steps"] > 0 and r["final_loss"] == r["final_loss"] for r in result.records)
    assert result.merge_max_abs_diff <= 1e-4
    fresh = CustomNet(6)
    fresh.load_state_dict(result.student.state_dict(), strict=True)
    assert count_params(fresh) == count_params(CustomNet(6))


# ------------------------------------------------------------------------------ exact merge (Eq. 6)
MERGE_PAIRS = [
    ("vgg16", "vgg16_graft", (3, 32, 32)),
    ("vgg16_bn", "vgg16_graft_bn", (3, 32, 32)),
    ("vgg16_bn", "vgg16_half_bn", (3, 32, 32)),
    ("resnet34", "resnet18", (3, 64, 64)),
    ("resnet56", "resnet20", (3, 32, 32)),
    ("digits_cnn", "digits_cnn_half", (1, 8, 8)),
]


def _randomize(module: nn.Module, seed: int) -> None:
    """Non-trivial adapters and BN statistics, so an inexact fold could not hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


@pytest.mark.parametrize("teacher_arch, student_arch, shape", MERGE_PAIRS)
def test_merged_student_equals_grafted_chain(teacher_arch, student_arch, shape):
    torch.manual_seed(1)
    classes = 10
    teacher = build_model(teacher_arch, num_classes=classes)
    student = build_model(student_arch, num_classes=classes)
    plan = build_plan(teacher, student, shape, inherit="none")
    _randomize(student, 2)
    probe = torch.randn((4, *shape))
    difference = plan.merge(probe)
    assert difference <= 1e-4
    plain = build_model(student_arch, num_classes=classes)
    plain.load_state_dict(student.state_dict(), strict=True)
    assert count_params(student) == count_params(plain)
    plain.eval()
    student.eval()
    with torch.no_grad():
        assert torch.equal(plain(probe), student(probe))


def test_vgg_pair_has_adapters_only_where_widths_differ():
    plan = build_plan(build_model("vgg16"), build_model("vgg16_graft"), (3, 32, 32), inherit="none")
    assert plan.adapter_cuts == [3, 4]  # after features.3 (512 vs 256) and features.4 (512 vs 256)
    targets = plan.fold_targets[4]
    assert [t.kind for t in targets] == ["linear"] and targets[0].positions == 1


# ------------------------------------------------------------------------------ inheritance, schedule
def test_auto_inheritance_copies_identical_vgg_blocks_and_schedules_the_rest():
    teacher, student = build_model("vgg16_bn"), build_model("vgg16_graft_bn")
    plan = build_plan(teacher, student, (3, 32, 32))
    assert plan.inherited == [0, 1, 2]
    assert torch.equal(student.blocks()[0][0].weight, teacher.blocks()[0][0].weight)
    assert not any(p.requires_grad for p in student.blocks()[0].parameters())
    stages = build_schedule(plan, ScheduleConfig("cifar10"), batch_size=64)
    assert [(s.kind, s.replaced, s.epochs) for s in stages] == [
        ("block", (3,), 100), ("block", (4,), 60), ("block", (5,), 60),
        ("net", (3, 4), 100), ("net", (3, 4, 5), 100),
    ]
    assert stages[0].lr == pytest.approx(2.5e-4) and stages[-1].lr == pytest.approx(1e-4)
    assert build_schedule(plan, ScheduleConfig("cifar10"), batch_size=6)[0].lr == pytest.approx(2.5e-4 * 6 / 64)


def test_reference_preset_gives_block_stage_adapters_ten_times_the_rate_and_leaves_network_rates_unscaled():
    from graftkd.graft.train import GraftRunner

    teacher, student = build_model("vgg16_bn"), build_model("vgg16_graft_bn")
    plan = build_plan(teacher, student, (3, 32, 32))
    stages = build_schedule(plan, ScheduleConfig("cifar10-reference"), batch_size=6)
    blocks, nets = [s for s in stages if s.kind == "block"], [s for s in stages if s.kind == "net"]
    assert [s.lr for s in blocks] == pytest.approx([2.5e-4 * 6 / 64] * 3)
    assert [s.adapter_lr for s in blocks] == pytest.approx([2.5e-3 * 6 / 64] * 3)
    assert [s.lr for s in nets] == pytest.approx([1e-4, 1e-4]) and all(s.adapter_lr is None for s in nets)
    # the paper's preset keeps one rate and the B/64 rule everywhere, and its stage records are unchanged
    plain = build_schedule(plan, ScheduleConfig("cifar10"), batch_size=6)
    assert all(s.adapter_lr is None and "adapter_lr" not in s.to_dict() for s in plain)
    assert plain[-1].lr == pytest.approx(1e-4 * 6 / 64)
    # overriding a preset's knob from the config
    assert build_schedule(plan, ScheduleConfig("cifar10", block_adapter_lr_scale=3.0), batch_size=64)[0].adapter_lr \
        == pytest.approx(7.5e-4)
    with pytest.raises(GraftkdError, match="block_adapter_lr_scale"):
        build_schedule(plan, ScheduleConfig("cifar10", block_adapter_lr_scale=0.0), batch_size=64)

    runner = GraftRunner(plan, torch.zeros(4, 3, 32, 32, dtype=torch.uint8), normalize=nn.Identity(), augment=None,
                         batch_size=2, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                         progress=False)
    optimizer = runner.make_optimizer(blocks[1])  # block 5: adapters on both sides
    scion = plan.scions[blocks[1].replaced[0]]
    adapters = {id(p) for p in [*scion.adapter_in.parameters(), *scion.adapter_out.parameters()]}
    assert len(adapters) == 2 and [g["lr"] for g in optimizer.param_groups] == pytest.approx([blocks[1].lr, blocks[1].adapter_lr])
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == adapters
    assert not adapters & {id(p) for p in optimizer.param_groups[0]["params"]}
    assert len(runner.make_optimizer(nets[0]).param_groups) == 1


def test_inheriting_a_block_that_differs_is_refused():
    with pytest.raises(GraftkdError, match="block 4 .*differ in architecture"):
        build_plan(build_model("vgg16"), build_model("vgg16_graft"), (3, 32, 32), inherit=[4])


# ---------------------------------------------------------------------------------------- errors
def test_spatial_mismatch_names_the_block_and_both_shapes():
    with pytest.raises(GraftkdError) as info:
        build_plan(CustomNet(8), CustomNet(4, stride=1), (1, 8, 8), teacher_blocks=PATHS, student_blocks=PATHS)
    message = str(info.value)
    assert "block 2 ('body')" in message and "16x4x4" in message and "8x8x8" in message


def test_class_count_mismatch():
    with pytest.raises(GraftkdError, match="teacher predicts 10 classes but the student 7"):
        build_plan(CustomNet(8), CustomNet(4, num_classes=7), (1, 8, 8), teacher_blocks=PATHS, student_blocks=PATHS)


def test_block_count_mismatch():
    with pytest.raises(GraftkdError, match="teacher has 3 blocks but student has 2"):
        build_plan(CustomNet(8), CustomNet(4), (1, 8, 8), teacher_blocks=PATHS, student_blocks=["stem", "head"])


def test_forward_that_is_not_the_block_composition_is_refused():
    class Glue(CustomNet):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(GraftkdError, match="not the composition"):
        build_plan(Glue(8), CustomNet(4), (1, 8, 8), teacher_blocks=PATHS, student_blocks=PATHS)


def test_unfoldable_cut_is_refused_at_setup():
    class Residual(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)  # identity shortcut consumes the input

    def net(width):
        model = CustomNet(width)
        model.body = nn.Sequential(Residual(width), nn.Conv2d(width, 2 * width, 1))
        return model

    with pytest.raises(GraftkdError, match="cannot fold the adapters into block 2 .*identity shortcut"):
        build_plan(net(8), net(4), (1, 8, 8), teacher_blocks=PATHS, student_blocks=PATHS)


def test_unknown_block_path():
    with pytest.raises(GraftkdError, match="no submodule 'trunk'"):
        build_plan(CustomNet(8), CustomNet(4), (1, 8, 8), teacher_blocks=["stem", "trunk", "head"])


# ----------------------------------------------------------------------------------- resume
def _run(tmp_path, interrupt_at: int | None):
    torch.manual_seed(0)
    teacher, student = CustomNet(12), CustomNet(6)
    calls = {"n": 0}

    def hook(forward):
        calls["n"] += 1
        if interrupt_at is not None and calls["n"] == interrupt_at:
            signal.raise_signal(signal.SIGINT)
        return 0.0

    config = _quick_config(eval_every=1, checkpoint_every_s=3600.0)
    return graft(
        teacher, student, _images(), normalize=ScaledNorm(), config=config, teacher_blocks=PATHS,
        student_blocks=PATHS, device="cpu", run_dir=tmp_path, progress=False, eval_hook=hook,
    )


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    from graftkd.engine.loop import MethodInterrupted

    reference = _run(tmp_path / "a", None).student.state_dict()
    with pytest.raises(MethodInterrupted, match="re-run the same command"):
        _run(tmp_path / "b", interrupt_at=5)  # mid-way through stage 3
    assert (tmp_path / "b" / "checkpoint.pt").is_file()
    resumed = _run(tmp_path / "b", None).student.state_dict()
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
