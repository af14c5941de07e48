"""The few-shot method zoo: golden loss values, the shared loop (resume), registry errors, smoke runs."""
from __future__ import annotations

import math

import pytest
import torch

from graftkd.data.normalize import Normalizer
from graftkd.distill.base import FewShotTask, build_method, list_methods
from graftkd.distill.losses import hint_loss, kd_loss, relative_feature_loss
from graftkd.errors import GraftkdError
from graftkd.models import build_model


def test_kd_loss_golden_values() -> None:
    # p_T = (0.75, 0.25), p_S = (0.5, 0.5): KL = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.1308120...
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    s = torch.zeros(2, 2)
    t = torch.tensor([[math.log(3.0), 0.0]] * 2)
    assert kd_loss(s, t, temperature=1.0).item() == pytest.approx(expected, abs=1e-6)
    # same distributions at T=2 (logits doubled): batchmean KL x T^2 = 4 x the above
    assert kd_loss(s, 2 * t, temperature=2.0).item() == pytest.approx(4 * expected, abs=1e-6)
    assert kd_loss(t, t, temperature=4.0).item() == pytest.approx(0.0, abs=1e-7)


def test_hint_loss_golden_value() -> None:
    assert hint_loss(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)).item() == pytest.approx(2.5)


def test_relative_feature_loss_golden_value() -> None:
    # ‖(1, 2) − (3, 0)‖² / ‖(3, 0)‖² = (4 + 4) / 9
    assert relative_feature_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.0]])).item() == pytest.approx(8 / 9)
    assert relative_feature_loss(torch.ones(2, 3, 4, 4), torch.ones(2, 3, 4, 4)).item() == 0.0


def test_method_registry_and_option_errors() -> None:
    assert {"graft", "kd", "fitnet", "whole"} <= set(list_methods())
    with pytest.raises(GraftkdError, match="did you mean kd"):
        build_method("kdd")
    with pytest.raises(GraftkdError, match="no option temp .*valid: temperature"):
        build_method("kd", {"temp": 2})
    with pytest.raises(GraftkdError, match="temperature must be float"):
        build_method("kd", {"temperature": "hot"})


def _task(tmp_path=None, epochs: int = 4, seed: int = 0, **kw) -> FewShotTask:
    torch.manual_seed(1)
    teacher = build_model("digits_cnn").eval()
    torch.manual_seed(seed)
    student = build_model("digits_cnn_half")
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (20, 1, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    return FewShotTask(teacher=teacher, student=student, images=images, normalize=Normalizer((0.0,), (1.0,)),
                       device=torch.device("cpu"), generator=g, batch_size=8, epochs=epochs, lr=1e-3, shots=2,
                       num_classes=10, run_dir=tmp_path, checkpoint_every_s=0.0, log_every=1, progress=False, **kw)


@pytest.mark.parametrize("name", ["kd", "fitnet", "whole"])
def test_loss_methods_train_and_return_the_plain_student(name: str) -> None:
    outcome = build_method(name).run(_task(epochs=6))
    fresh = build_model("digits_cnn_half")
    fresh.load_state_dict(outcome.student.state_dict(), strict=True)
    assert not outcome.student.training
    for stage in outcome.stages:
        curve = [loss for _, loss in stage["loss_curve"]]
        assert all(math.isfinite(v) for v in curve) and stage["steps"] > 0
    first, last = outcome.stages[-1]["loss_curve"][0][1], outcome.stages[-1]["loss_curve"][-1][1]
    assert last < first


def test_fitnet_hint_stage_only_trains_the_front_and_the_regressor() -> None:
    task = _task(epochs=4)
    method = build_method("fitnet", {"hint_fraction": 0.5})
    before = {k: v.clone() for k, v in task.student.state_dict().items()}
    method.setup(task)
    hint, kd = method.stages(task)
    trained = {id(p) for m in hint.modules for p in m.parameters()}
    head = task.student.block_parts()[-1]
    assert not any(id(p) in trained for m in head for p in m.parameters())
    assert any(id(p) in trained for p in method.regressor.parameters())
    assert hint.epochs == 2 and kd.epochs == 2
    assert all(torch.equal(before[k], v) for k, v in task.student.state_dict().items())


class _Boom(RuntimeError):
    pass


def test_interrupted_loss_method_resumes_to_identical_weights(tmp_path) -> None:
    straight = build_method("kd").run(_task(epochs=5)).student.state_dict()

    calls = {"n": 0}

    def crash(forward):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Boom("killed")
        return 0.0

    with pytest.raises(_Boom):
        build_method("kd").run(_task(tmp_path, epochs=5, eval_hook=crash, eval_every=1))
    assert (tmp_path / "checkpoint.pt").is_file()
    resumed = build_method("kd").run(_task(tmp_path, epochs=5)).student.state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_evaluation_curves_do_not_change_the_result() -> None:
    plain = build_method("whole").run(_task(epochs=4)).student.state_dict()
    seen = []
    curved = build_method("whole").run(_task(epochs=4, eval_hook=lambda f: seen.append(1) or 1.0, eval_every=1))
    assert len(seen) == 4
    assert all(torch.equal(plain[k], v) for k, v in curved.student.state_dict().items())


def test_patient_recipe_with_precision_auto_times_the_settings_without_changing_the_run(monkeypatch) -> None:
    """precision "auto" times each candidate setting on the real stage; the probe leaves the student and the
    run's generator as they were, so a run whose choice is fp32/contiguous equals a pinned fp32 run."""
    from graftkd.engine import loop

    monkeypatch.setattr(loop, "remembered_setting", lambda *a: loop.fastest_setting(*a))  # every run times here
    from graftkd.engine.recipe import Recipe

    recipe = Recipe(samples=8 * 20, batch_size=8, steps_per_chunk=10, recalibrate_bn=False)
    pinned = build_method("kd").run(_task(recipe=recipe, precision="fp32", epochs=recipe.chunks))
    task = _task(recipe=recipe, precision="auto", epochs=recipe.chunks)
    before = {k: v.clone() for k, v in task.student.state_dict().items()}
    generator_state = task.generator.get_state()
    speed = loop.fastest_setting(build_method("kd"), task, build_method("kd").stages(task)[0])
    assert all(torch.equal(before[k], v) for k, v in task.student.state_dict().items())
    assert torch.equal(generator_state, task.generator.get_state())
    assert {(r["precision"], r["channels_last"]) for r in speed["candidates"]} >= {("fp32", False), ("fp32", True)}
    assert all(r["images_per_second"] > 0 for r in speed["candidates"])
    chosen = {"precision": "fp32", "channels_last": False}
    monkeypatch.setattr(loop, "fastest_setting", lambda *a: {"candidates": [], "chosen": chosen})
    auto = build_method("kd").run(_task(recipe=recipe, precision="auto", epochs=recipe.chunks))
    assert auto.extra["speed"]["chosen"] == chosen
    a, b = pinned.student.state_dict(), auto.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    chosen = {"precision": "fp32", "channels_last": True}  # another memory format: trains, hands back contiguous
    cl = build_method("kd").run(_task(recipe=recipe, precision="auto", epochs=recipe.chunks))
    assert all(v.is_contiguous() for v in cl.student.state_dict().values())
    assert all(torch.allclose(a[k].float(), v.float(), atol=1e-3) for k, v in cl.student.state_dict().items())
    assert cl.extra["speed"]["chosen"] == chosen


def test_precision_auto_remembers_its_choice_so_a_rerun_trains_alike(monkeypatch, tmp_path) -> None:
    """Timings of a few steps are noisy: a second run of the same task must not time again (it could pick
    another memory format and so another student); it takes the remembered choice, and says where from."""
    from graftkd.engine import loop
    from graftkd.engine.recipe import Recipe

    monkeypatch.setattr(loop, "settings_path", lambda: tmp_path / "settings.json")
    picks = iter([{"precision": "fp32", "channels_last": True}, {"precision": "fp32", "channels_last": False}])
    monkeypatch.setattr(loop, "fastest_setting", lambda *a: {"candidates": [], "chosen": next(picks)})
    recipe = Recipe(samples=8 * 20, batch_size=8, steps_per_chunk=10, recalibrate_bn=False)
    first = build_method("kd").run(_task(recipe=recipe, precision="auto", epochs=recipe.chunks))
    second = build_method("kd").run(_task(recipe=recipe, precision="auto", epochs=recipe.chunks))
    assert first.extra["speed"]["chosen"] == second.extra["speed"]["chosen"] == {"precision": "fp32",
                                                                                 "channels_last": True}
    assert second.extra["speed"]["remembered"] == str(tmp_path / "settings.json")
    a, b = first.student.state_dict(), second.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    (tmp_path / "settings.json").unlink()  # deleting the file times again
    third = build_method("kd").run(_task(recipe=recipe, precision="auto", epochs=recipe.chunks))
    assert third.extra["speed"]["chosen"] == {"precision": "fp32", "channels_last": False}


def test_feature_kd_golden_value_with_and_without_a_channel_choice() -> None:
    """Every matched path adds its relative error: a path the derivation did not narrow counts too."""
    method = build_method("feature_kd", {"beta": 2.0})
    method.pairs, method.select = [("a", "a"), ("b", "b")], {"b": torch.tensor([1])}
    s_logits = torch.zeros(2, 2)
    t_logits = torch.tensor([[math.log(3.0), 0.0]] * 2)
    student = {"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([[0.0]])}
    teacher = {"a": torch.tensor([[3.0, 0.0]]), "b": torch.tensor([[5.0, 2.0]])}
    terms = method.loss(None, s_logits, t_logits, student, teacher)
    # a: ‖(1, 2) − (3, 0)‖² / 9 = 8/9; b keeps teacher channel 1: (0 − 2)² / 4 = 1
    assert terms["features"].item() == pytest.approx(2.0 * (8 / 9 + 1.0))
    assert terms["kd"].item() == pytest.approx(kd_loss(s_logits, t_logits, 4.0).item())


@pytest.mark.parametrize("name", ["kd", "whole", "fitnet"])
def test_a_student_of_another_family_trains_whole_and_inherits_nothing(name: str) -> None:
    # VGG16-BN -> resnet18_cifar (6 blocks against 4) was refused by the grafting plan that inheritance asks,
    # though no method but grafting pairs blocks; here vgg8 (4 blocks) -> resnet8 (3)
    torch.manual_seed(0)
    teacher, student = build_model("vgg8").eval(), build_model("resnet8")
    images = torch.randint(0, 256, (8, 3, 32, 32), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    task = FewShotTask(teacher=teacher, student=student, images=images, normalize=Normalizer((0.5,) * 3, (0.25,) * 3),
                       device=torch.device("cpu"), generator=torch.Generator().manual_seed(0), batch_size=4, epochs=2,
                       lr=1e-3, shots=1, num_classes=10, checkpoint_every_s=0.0, log_every=1, progress=False)
    outcome = build_method(name).run(task)
    assert all(stage["steps"] > 0 for stage in outcome.stages)
    assert outcome.extra["inherited_blocks"] == [] and "4 blocks" in outcome.extra["inherit_refused"]
    if name == "fitnet":  # each model's middle block; maps of two sizes take a ConvReg
        assert outcome.extra["hint"] == {"student": "layer2", "teacher": "relu2", "regressor": "convreg"}
    build_model("resnet8").load_state_dict(outcome.student.state_dict(), strict=True)
    named = FewShotTask(**{**task.__dict__, "student": build_model("resnet8"), "inherit": [1]})
    with pytest.raises(GraftkdError, match="teacher has 4 blocks but student has 3"):
        build_method(name).run(named)
