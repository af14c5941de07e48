"""The patient recipe in the shared loop: teacher and student see the same mixed tensor, the sample budget is
exact, and the optional weight average is what the run hands back."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from graftkd.data.normalize import Normalizer
from graftkd.distill.base import FewShotTask, build_method
from graftkd.engine.recipe import Recipe, StartAnchor, WeightAverage
from graftkd.errors import GraftkdError
from graftkd.models import build_model


def _spy(model: nn.Module) -> list[torch.Tensor]:
    """Every input ``model`` sees from now on, one entry per forward."""
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


def _task(recipe: Recipe, seed: int = 0, run_dir=None, teacher: nn.Module | None = None, student: nn.Module | None = None,
          **kw) -> FewShotTask:
    torch.manual_seed(1)
    teacher = teacher if teacher is not None else build_model("digits_cnn").eval()
    torch.manual_seed(seed)
    student = student if student is not None else build_model("digits_cnn_half")
    images = torch.randint(0, 256, (20, 1, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    return FewShotTask(teacher=teacher, student=student, images=images, normalize=Normalizer((0.0,), (1.0,)),
                       device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed),
                       batch_size=recipe.batch_size, epochs=recipe.chunks, lr=recipe.lr, shots=2, num_classes=10,
                       run_dir=run_dir, checkpoint_every_s=0.0, log_every=1, progress=False, recipe=recipe,
                       precision="fp32", **kw)


@pytest.mark.parametrize("mix, options", [("mixup", {}), ("cutmix", {}),
                                          ("mixup+cutmix", {"mix_per_sample": True, "jitter": 0.4})])
def test_the_teacher_scores_the_exact_mixed_tensor_the_student_trains_on(mix: str, options: dict) -> None:
    recipe = Recipe(samples=8 * 6, batch_size=8, steps_per_chunk=3, mix=mix, recalibrate_bn=False, **options)
    torch.manual_seed(1)
    teacher, student = build_model("digits_cnn").eval(), build_model("digits_cnn_half")
    teacher_saw, student_saw = _spy(teacher), _spy(student)
    task = _task(recipe, teacher=teacher, student=student)
    build_method("kd").run(task)
    # the training steps are the last forwards of each (the method's plan traces a zero probe first)
    teacher_saw, student_saw = teacher_saw[-recipe.steps:], student_saw[-recipe.steps:]
    assert all(len(x) == recipe.batch_size for x in teacher_saw + student_saw)
    plain = {tuple(img.flatten().tolist()) for img in task.normalize(task.images.float())}
    for t_in, s_in in zip(teacher_saw, student_saw):
        assert torch.equal(t_in, s_in)  # the very tensor, not a re-draw and not the un-mixed batch
        # mixed: at least one image of the batch is none of the (un-augmented, un-mixed) few-shot images
        assert any(tuple(img.flatten().tolist()) not in plain for img in t_in)


@pytest.mark.parametrize("samples", [8 * 6, 8 * 6 + 5, 3])
def test_the_sample_budget_is_exact(samples: int) -> None:
    recipe = Recipe(samples=max(samples, 8), batch_size=8, steps_per_chunk=4, recalibrate_bn=False)
    outcome = build_method("kd").run(_task(recipe))
    assert sum(stage["images"] for stage in outcome.stages) == recipe.samples
    assert sum(stage["steps"] for stage in outcome.stages) == recipe.steps


def test_a_two_stage_method_splits_the_budget_exactly() -> None:
    recipe = Recipe(samples=8 * 7 + 3, batch_size=8, steps_per_chunk=2, recalibrate_bn=False)
    outcome = build_method("fitnet").run(_task(recipe))
    assert len(outcome.stages) == 2
    assert sum(stage["images"] for stage in outcome.stages) == recipe.samples
    shares = [recipe.stage_budget(0, 1, 3), recipe.stage_budget(1, 2, 3)]
    assert sum(images for images, _ in shares) == recipe.samples


def test_a_budget_below_one_batch_is_refused() -> None:
    with pytest.raises(GraftkdError, match="less than one batch"):
        Recipe(samples=10, batch_size=64)
    with pytest.raises(GraftkdError, match="ema decay"):
        Recipe(ema=1.0)


def test_the_recipe_is_refused_where_the_loop_does_not_train_the_student_itself() -> None:
    from graftkd.distill.base import check_recipe, recipe_methods

    takes = recipe_methods()
    assert {"kd", "fitnet", "whole", "feature_kd"} <= set(takes)
    assert not {"graft", "fskd", "graft_fskd", "cross"} & set(takes)  # own stages, closed form, merged student
    check_recipe(build_method("kd"))
    with pytest.raises(GraftkdError, match="'cross' is not one of them: use --recipe paper") as info:
        check_recipe(build_method("cross"))
    assert "kd" in str(info.value) and "cross" not in str(info.value).split("'cross'")[0]


def test_weight_average_golden_values() -> None:
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    average = WeightAverage(layer, decay=0.5)
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            layer.weight.fill_(value)
        average.update()
    # decays min(0.5, (1+t)/(10+t)) = 0.1, 0.1818.., 0.25 for t = 0, 1, 2
    expected = 0.0
    for t, value in enumerate((1.0, 2.0, 3.0)):
        d = min(0.5, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * value
    average.copy_to_module()
    assert layer.weight.item() == pytest.approx(expected, abs=1e-6)


def test_ema_hands_back_the_averaged_weights_and_resumes_them(tmp_path, stop_after_saves) -> None:
    recipe = Recipe(samples=8 * 8, batch_size=8, steps_per_chunk=2, recalibrate_bn=False, ema=0.9)
    plain = build_method("kd").run(_task(Recipe(**{**recipe.to_dict(), "ema": 0.0})))
    averaged = build_method("kd").run(_task(recipe))
    assert averaged.extra["weight_average"] == {"decay": 0.9, "updates": recipe.steps}
    a, b = plain.student.state_dict(), averaged.student.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].dtype.is_floating_point)
    # stopped after two chunks, then resumed: the same averaged student as one uninterrupted run
    stop_after_saves(2)
    with pytest.raises(KeyboardInterrupt):
        build_method("kd").run(_task(recipe, run_dir=tmp_path))
    stop_after_saves(None)
    resumed = build_method("kd").run(_task(recipe, run_dir=tmp_path))
    assert resumed.extra["resumed"]["seconds_before"] > 0  # the stopped process's training time
    c = resumed.student.state_dict()
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_start_anchor_adds_the_l2sp_gradient() -> None:
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0]]))
    anchor = StartAnchor(layer, strength=0.5)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 0.0]]))
    loss = (layer.weight ** 2).sum()  # gradient 2 w = [6, 0]
    loss.backward()
    anchor.pull()
    # plus the gradient of 0.5 / 2 * ||w - w0||^2 = 0.5 * ([3, 0] - [1, -2]) = [1, 1]
    assert layer.weight.grad.tolist() == [[7.0, 1.0]]
    with pytest.raises(GraftkdError, match="anchor strength"):
        Recipe(anchor=-1.0)


def test_a_strong_anchor_holds_the_student_near_its_start_and_resumes_alike(tmp_path, stop_after_saves) -> None:
    recipe = Recipe(samples=8 * 8, batch_size=8, steps_per_chunk=2, recalibrate_bn=False, anchor=50.0)
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in build_model("digits_cnn_half").state_dict().items()}

    def drift(outcome) -> float:
        return sum(float((v - start[k]).abs().sum()) for k, v in outcome.student.state_dict().items()
                   if v.dtype.is_floating_point and "running" not in k)

    free = build_method("kd").run(_task(Recipe(**{**recipe.to_dict(), "anchor": 0.0})))
    held = build_method("kd").run(_task(recipe))
    assert drift(held) < 0.5 * drift(free)
    stop_after_saves(2)
    with pytest.raises(KeyboardInterrupt):
        build_method("kd").run(_task(recipe, run_dir=tmp_path))
    stop_after_saves(None)
    resumed = build_method("kd").run(_task(recipe, run_dir=tmp_path))
    assert resumed.extra["resumed"] is not None
    a, b = held.student.state_dict(), resumed.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_color_jitter_golden_values() -> None:
    from graftkd.data.augment import color_jitter

    gray = torch.full((2, 3, 4, 4), 100, dtype=torch.uint8)  # contrast and saturation leave a flat gray alone
    out = color_jitter(gray, 0.5, torch.Generator().manual_seed(0))
    brightness = 1.0 + 0.5 * (2.0 * torch.rand(2, generator=torch.Generator().manual_seed(0)) - 1.0)
    torch.testing.assert_close(out, (100 / 255 * brightness).view(2, 1, 1, 1).expand(2, 3, 4, 4).clamp(0, 1))
    colour = torch.rand(3, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(color_jitter(colour, 0.0), colour)
    jittered = color_jitter(colour, 0.9, torch.Generator().manual_seed(2))
    assert jittered.min() >= 0 and jittered.max() <= 1 and not torch.allclose(jittered, colour)
    with pytest.raises(GraftkdError, match="jitter"):
        Recipe(jitter=1.5)


def test_mix_per_sample_golden_values() -> None:
    """Mixup per image: image i is lam_i x_i + (1 - lam_i) x_partner(i), with the draws replayed from the
    same seed; CutMix per image: every pixel is the image's own or its partner's, boxes of different sizes."""
    from graftkd.data.batcher import _beta, mix_per_sample

    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mixed = mix_per_sample(x, "mixup", 1.0, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    partner = torch.randperm(6, generator=g)
    lam = torch.tensor([_beta(1.0, g) for _ in range(6)]).view(6, 1, 1, 1)
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[partner])
    assert len(set(lam.flatten().tolist())) == 6
    cut = mix_per_sample(x, "cutmix", 1.0, torch.Generator().manual_seed(7))
    own, theirs = cut == x, cut == x[partner]
    assert bool((own | theirs).all())
    taken = (~own).float().mean(dim=(1, 2, 3))
    assert len(set(taken.tolist())) > 1  # not one box for the whole batch
    assert torch.equal(mix_per_sample(x, "none", 1.0, torch.Generator()), x)
