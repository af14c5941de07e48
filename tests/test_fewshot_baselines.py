"""FSKD and Cross distillation: golden values for the closed-form fit and fold, and small smoke runs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from graftkd.data.normalize import Normalizer
from graftkd.distill.base import FewShotTask, build_method
from graftkd.distill.fewshot.fskd import solve_correction
from graftkd.errors import GraftkdError
from graftkd.models import build_model

CPU = torch.device("cpu")


def make_task(teacher: nn.Module, student: nn.Module, *, count: int = 20, shape=(1, 8, 8), epochs: int = 4,
              lr: float = 1e-3, batch_size: int = 32, teacher_arch: str = "", student_arch: str = "",
              seed: int = 0) -> FewShotTask:
    images = torch.randint(0, 256, (count, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    channels = shape[0]
    return FewShotTask(
        teacher=teacher.eval(), student=student, images=images,
        normalize=Normalizer((0.0,) * channels, (1.0,) * channels), device=CPU,
        generator=torch.Generator().manual_seed(0), batch_size=batch_size, epochs=epochs, lr=lr, shots=2,
        num_classes=10, inherit="auto", teacher_arch=teacher_arch, student_arch=student_arch, progress=False,
    )


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking BatchNorm statistics, so pruning a BN layer is actually exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
    return model


# ------------------------------------------------------------------------------------------ FSKD
def chain(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10),
    )


def exact_pair() -> tuple[nn.Sequential, nn.Sequential, torch.Tensor, torch.Tensor]:
    """A teacher whose 2 pruned channels are 0.5× copies of the 2 kept ones, so Q = I + A is exact.

    conv1 outputs [z0, z1, z0/2, z1/2] (the copies have the smaller L1 norm, so they are pruned); after
    the ReLU, conv2's weights on the copies are 2·A·W (A mixes output channels), so the teacher's conv2
    output is (I + A)·W * r and the pruned student's is W * r.
    """
    torch.manual_seed(0)
    teacher = randomize_norms(chain(4))
    a = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.4, -0.3], [0.2, 0.1, -0.5]])
    with torch.no_grad():
        w1, b1 = teacher[0].weight, teacher[0].bias
        w1[2:], b1[2:] = 0.5 * w1[:2], 0.5 * b1[:2]
        kept = teacher[2].weight[:, :2].clone()
        teacher[2].weight[:, 2:] = 2 * torch.einsum("po,oikl->pikl", a, kept)
    return teacher, chain(2), kept, torch.eye(3) + a


def test_fskd_exact_correction_and_fold():
    teacher, student, kept, q_exact = exact_pair()
    task = make_task(teacher, student, count=12)
    outcome = build_method("fskd", {"ridge": 0.0}).run(task)
    layers = {row["layer"]: row for row in outcome.extra["layers"]}
    assert [p["layer"] for p in outcome.extra["pruned_layers"]] == ["0"]
    assert layers["2"]["rel_error_before"] > 0.05  # the pruning really hurt conv2
    assert layers["2"]["rel_error_after"] < 1e-10  # and Q fixes it exactly
    # golden value: the folded conv2 weight is (I + A)·W_kept, the corrected layer
    folded = outcome.student[2].weight.detach()
    assert torch.allclose(folded, torch.einsum("po,oikl->pikl", q_exact, kept), atol=1e-4)
    x = task.normalize(task.images)
    with torch.no_grad():
        assert torch.allclose(outcome.student(x), teacher(x), atol=1e-4)
    assert outcome.extra["logit_rel_error_corrected"] < 1e-10 < outcome.extra["logit_rel_error_pruned"]


def test_solve_correction_ridge_shrinks_to_identity():
    z = torch.randn(200, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    q = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    gram, cross = z.T @ z, z.T @ (z @ q.T)
    assert torch.allclose(solve_correction(gram, cross, 0.0), q, atol=1e-8)
    assert torch.allclose(solve_correction(gram, cross, 1e6), torch.eye(4, dtype=torch.float64), atol=1e-3)


def test_fskd_digits_returns_the_requested_student():
    torch.manual_seed(0)
    teacher = randomize_norms(build_model("digits_cnn"))
    task = make_task(teacher, build_model("digits_cnn_half"), count=20, student_arch="digits_cnn_half")
    outcome = build_method("fskd").run(task)
    reference = build_model("digits_cnn_half")
    reference.load_state_dict(outcome.student.state_dict(), strict=True)
    assert outcome.extra["arch"] == "digits_cnn_half"
    assert [p["kept"] for p in outcome.extra["pruned_layers"]] == [16, 32, 64]
    for row in outcome.extra["layers"]:
        assert row["rel_error_after"] < row["rel_error_before"], row
        assert row["fold_max_abs_diff"] < 1e-4
    assert outcome.extra["logit_rel_error_corrected"] < outcome.extra["logit_rel_error_pruned"]
    assert not outcome.student.training and outcome.stages[0]["steps"] == 0


def test_fskd_refuses_a_student_of_another_depth():
    task = make_task(build_model("resnet56"), build_model("resnet20"), count=2, shape=(3, 32, 32),
                     teacher_arch="resnet56", student_arch="resnet20")
    with pytest.raises(GraftkdError, match="channel-pruned teacher.*resnet20 has 20 conv/linear layers") as info:
        build_method("fskd").run(task)
    assert "\n" not in str(info.value) and "cross" in str(info.value)
    assert getattr(info.value, "unsupported", False)


# ----------------------------------------------------------------------------------------- Cross
def cross_run(mu: float, epochs: int = 16):
    torch.manual_seed(0)
    teacher = randomize_norms(build_model("digits_cnn"))
    torch.manual_seed(1)
    task = make_task(teacher, build_model("digits_cnn_half"), count=20, epochs=epochs, lr=1e-2)
    return build_method("cross", {"mu": mu}).run(task)


def test_cross_smoke_loads_into_student_and_learns():
    outcome = cross_run(0.6)
    reference = build_model("digits_cnn_half")
    reference.load_state_dict(outcome.student.state_dict(), strict=True)
    assert [s["name"] for s in outcome.stages] == ["features.0", "features.1", "features.2", "classifier"]
    assert sum(s["epochs"] for s in outcome.stages) == 16 and sum(s["steps"] for s in outcome.stages) == 16
    for stage in outcome.stages:
        curve = stage["loss_curve"]
        assert len(curve) == 4 and curve[-1][1] < curve[0][1], stage
        assert set(stage) >= {"name", "epochs", "steps", "seconds", "final_loss", "loss_curve"}
    assert set(outcome.stages[1]["loss_terms"]) == {"teacher_input", "student_input"}
    assert outcome.extra["merge_max_abs_diff"] <= 1e-4 and not outcome.student.training


def test_cross_mu_changes_the_result():
    teacher_only, student_only = cross_run(1.0, epochs=8), cross_run(0.0, epochs=8)
    assert set(teacher_only.stages[1]["loss_terms"]) == {"teacher_input"}
    assert set(student_only.stages[1]["loss_terms"]) == {"student_input"}
    a, b = teacher_only.student.state_dict(), student_only.student.state_dict()
    assert not torch.equal(a["features.2.0.weight"], b["features.2.0.weight"])
    # block 1 has no earlier student block: both settings train it on the same input, identically
    assert torch.equal(a["features.0.0.weight"], b["features.0.0.weight"])


def test_cross_options_and_budget_are_checked():
    with pytest.raises(GraftkdError, match="no option lambda"):
        build_method("cross", {"lambda": 0.5})
    with pytest.raises(GraftkdError, match="mu must be in"):
        build_method("cross", {"mu": 1.5}).run(make_task(build_model("digits_cnn"), build_model("digits_cnn_half")))
    with pytest.raises(GraftkdError, match="at least one epoch per trained block"):
        build_method("cross").run(make_task(build_model("digits_cnn"), build_model("digits_cnn_half"), epochs=2))


# ------------------------------------------------------------------------------ graft from FSKD
def test_channel_selection_adapters_compose_to_the_identity():
    from graftkd.graft.adapters import ChannelAdapter

    narrow_to_wide, wide_to_narrow = ChannelAdapter(3, 5), ChannelAdapter(5, 3)
    kept = torch.tensor([4, 0, 2])
    narrow_to_wide.set_channel_selection(kept)
    wide_to_narrow.set_channel_selection(kept)
    assert torch.equal(wide_to_narrow.matrix @ narrow_to_wide.matrix, torch.eye(3))
    x = torch.randn(2, 5, 4, 4)
    assert torch.equal(wide_to_narrow(x), x[:, kept])  # picks the kept teacher channels
    written = narrow_to_wide(x[:, kept])
    assert torch.equal(written[:, kept], x[:, kept]) and not written[:, [1, 3]].any()  # zeros elsewhere
    with pytest.raises(ValueError, match="3 distinct channel indices in \\[0, 5\\)"):
        wide_to_narrow.set_channel_selection(torch.tensor([0, 0, 1]))


def graft_fskd_task(epochs: int, seed: int = 0) -> FewShotTask:
    from graftkd.graft import ScheduleConfig

    torch.manual_seed(0)
    teacher = randomize_norms(build_model("digits_cnn"))
    task = make_task(teacher, build_model("digits_cnn_half"), count=20, student_arch="digits_cnn_half",
                     teacher_arch="digits_cnn", seed=seed)
    task.schedule = ScheduleConfig("digits", block_epochs=epochs, net_epochs=epochs)
    task.augment = None
    return task


def test_graft_fskd_without_steps_returns_fskds_student():
    """Adapters start as the pruning's channel choice, so the merged student before training is FSKD's."""
    task = graft_fskd_task(epochs=0)
    outcome = build_method("graft_fskd").run(task)
    reference = build_method("fskd").run(graft_fskd_task(epochs=0))
    x = task.normalize(task.images).float()
    with torch.no_grad():
        assert torch.allclose(outcome.student(x), reference.student(x), atol=1e-4)
    start = outcome.extra["start"]
    assert start["init"] == "fskd" and start["logit_rel_error_corrected"] < start["logit_rel_error_pruned"]
    assert outcome.extra["merge_max_abs_diff"] < 1e-4


def test_graft_fskd_trains_from_the_pruned_start_and_checks_its_options():
    pruned = graft_fskd_task(epochs=0)
    before = build_method("graft_fskd", {"init": "pruned"}).run(pruned).student
    trained = build_method("graft_fskd", {"init": "pruned"}).run(graft_fskd_task(epochs=3))
    assert [s["steps"] > 0 for s in trained.stages] == [True] * len(trained.stages)
    x = pruned.normalize(pruned.images).float()
    with torch.no_grad():  # the stages moved the student away from the plain pruned teacher
        assert not torch.allclose(trained.student(x), before(x), atol=1e-3)
    with pytest.raises(GraftkdError, match="init must be one of fskd, pruned"):
        build_method("graft_fskd", {"init": "random"}).run(graft_fskd_task(epochs=0))


def test_graft_fskd_refuses_a_student_that_is_not_a_pruned_teacher():
    task = make_task(build_model("resnet56"), build_model("resnet20"), count=2, shape=(3, 32, 32),
                     teacher_arch="resnet56", student_arch="resnet20")
    with pytest.raises(GraftkdError, match="channel-pruned teacher") as info:
        build_method("graft_fskd").run(task)
    assert getattr(info.value, "unsupported", False)


def test_fskd_without_corrections_is_the_plainly_pruned_teacher():
    teacher, student, kept, _ = exact_pair()
    outcome = build_method("fskd", {"correct": False}).run(make_task(teacher, student, count=12))
    assert outcome.extra["layers"] == [] and outcome.stages[0]["solves"] == 0
    assert torch.equal(outcome.student[2].weight, kept)  # conv2 keeps the teacher's weights on kept inputs
    assert outcome.extra["logit_rel_error_corrected"] == outcome.extra["logit_rel_error_pruned"] > 0


def test_cross_distillation_runs_in_the_shared_loop_and_resumes_bit_identically(tmp_path, stop_after_saves) -> None:
    """Cross distillation's blocks are stages of the shared loop: a run stopped mid-way and started again ends
    with the same weights as an uninterrupted one (it used to start again from scratch)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_distill import _task

    from graftkd.distill.base import build_method

    whole = build_method("cross").run(_task(epochs=6))
    assert [r["block"] for r in whole.stages] == [1, 2, 3, 4] and whole.extra["merge_max_abs_diff"] < 1e-4
    stop_after_saves(3)  # in the second block
    with pytest.raises(KeyboardInterrupt):
        build_method("cross").run(_task(tmp_path, epochs=6))
    stop_after_saves(None)
    resumed = build_method("cross").run(_task(tmp_path, epochs=6))
    assert resumed.extra["resumed"] is not None
    a, b = whole.student.state_dict(), resumed.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
