"""Students derived from the teacher's weights, on random weights: every supported pattern, exactness, records."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from graftkd.derive import Underivable, derive_student
from graftkd.derive.depth import DEPTH_RULES, apply_depth, plan_depth
from graftkd.derive.width import plan_width
from graftkd.engine.agreement import agreement, agreement_pool
from graftkd.engine.bn import reestimate_batchnorm
from graftkd.data.batcher import mix_batch, repeated_batch
from graftkd.engine.recipe import Recipe
from graftkd.models import build_model


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so copying the wrong channel would show."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _strict_copy(student: nn.Module, arch: str, **kwargs) -> nn.Module:
    plain = build_model(arch, **kwargs)
    plain.load_state_dict(student.state_dict(), strict=True)
    return plain.eval()


@torch.no_grad()
def test_depth_resnet56_to_resnet20_takes_evenly_spaced_units_and_is_the_reduced_teacher():
    torch.manual_seed(0)
    teacher, student = _randomise_norms(build_model("resnet56")), build_model("resnet20")
    record = derive_student(teacher, student, (3, 32, 32), depth_rule="even")
    assert record.whole and [row["status"] for row in record.blocks] == ["units chosen"] * 3
    assert [u["kept"] for row in record.blocks for u in row["units"]] == [[0, 4, 8]] * 3
    x = torch.randn(4, 3, 32, 32)
    reduced = apply_depth(teacher, record.depth).eval()
    plain = _strict_copy(student, "resnet20")
    assert torch.equal(plain(x), reduced(x))
    assert torch.equal(student.layer2[1].conv1.weight, teacher.layer2[4].conv1.weight)
    assert record.depth.teacher_path("layer3.2.bn2") == "layer3.8.bn2"


@torch.no_grad()
def test_keeping_every_unit_reproduces_the_teacher_exactly():
    teacher, student = _randomise_norms(build_model("resnet32")), build_model("resnet32")
    record = derive_student(teacher, student, (3, 32, 32))
    assert [row["status"] for row in record.blocks] == ["inherited"] * 3
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(student.eval()(x), teacher(x))


def test_depth_rules_first_and_greedy():
    torch.manual_seed(1)
    teacher, student = _randomise_norms(build_model("resnet32")), build_model("resnet20")
    first = plan_depth(teacher, student, "first")
    assert first.selections == {"layer1": [0, 1, 2], "layer2": [0, 1, 2], "layer3": [0, 1, 2]}
    # a unit whose residual branch is zero changes nothing when dropped: greedy must drop it first
    with torch.no_grad():
        for unit in (teacher.layer2[1], teacher.layer2[2]):
            unit.bn2.weight.zero_()
            unit.bn2.bias.zero_()
    x = torch.randn(8, 3, 32, 32)
    from graftkd.derive.depth import logit_error_fn

    greedy = plan_depth(teacher, student, "greedy", logit_error_fn(teacher, x))
    assert greedy.selections["layer2"] == [0, 3, 4]
    with pytest.raises(Underivable, match="needs the few-shot images"):
        plan_depth(teacher, student, "greedy")


def test_greedy_replays_the_units_before_a_trial_and_chooses_as_a_full_recompute_does(monkeypatch):
    """The replayed units give the same errors, so the same units: a ResNet, and a chain with in-place ReLUs (which
    write into what the unit before them returned)."""
    import graftkd.derive.depth as depth
    from graftkd.derive.depth import logit_error_fn

    torch.manual_seed(3)
    teacher, student = _randomise_norms(build_model("resnet32")), build_model("resnet20")
    x = torch.randn(12, 3, 32, 32)

    def block():
        return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True))

    chain_t = _randomise_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(*[block() for _ in range(6)]),
                                             nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)))
    chain_s = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(*[block() for _ in range(2)]), nn.ReLU(inplace=True),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    y = torch.randn(6, 3, 8, 8)
    for model, small, inputs in ((teacher, student, x), (chain_t, chain_s, y)):
        error = logit_error_fn(model, inputs, chunk=5)  # chunks: the replay keeps one output per call
        replayed = plan_depth(model, small, "greedy", error).selections
        monkeypatch.setattr(depth, "REPLAY_BYTES", -1)  # nothing recorded: every trial runs the whole network
        assert plan_depth(model, small, "greedy", error).selections == replayed
        monkeypatch.setattr(depth, "REPLAY_BYTES", 2 << 30)


@torch.no_grad()
def test_width_vgg_chain_takes_l1_channels_and_loads_strictly():
    torch.manual_seed(0)
    teacher, student = _randomise_norms(build_model("vgg16_bn")), build_model("vgg16_half_bn")
    record = derive_student(teacher, student, (3, 32, 32), width_rule="l1")
    assert record.whole and all(row["status"] == "channels chosen" for row in record.blocks)
    _strict_copy(student, "vgg16_half_bn")
    layer = record.width.layers[0]
    scores = teacher.get_submodule(layer.path).weight.abs().flatten(1).sum(1)
    assert torch.equal(layer.out_keep, torch.topk(scores, len(layer.out_keep)).indices.sort().values)
    assert torch.equal(student.get_submodule(layer.path).weight, teacher.get_submodule(layer.path).weight[layer.out_keep])


@torch.no_grad()
def test_width_activation_rule_keeps_the_channels_that_fire():
    torch.manual_seed(0)
    teacher, student = _randomise_norms(build_model("digits_cnn")), build_model("digits_cnn_half")
    first_bn = next(m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d))
    first_bn.bias.copy_(torch.full_like(first_bn.bias, -50.0))
    live = torch.arange(0, first_bn.num_features, 2)
    first_bn.bias[live] = 5.0  # only the even channels are ever non-zero after the ReLU
    x = torch.randn(16, 1, 8, 8)
    plan = plan_width(teacher, student, (1, 8, 8), "activation", x)
    assert torch.equal(plan.layers[0].out_keep, live)


@torch.no_grad()
def test_width_through_residual_sums_and_projection_shortcuts():
    """torchvision layout, ResNet-34 -> ResNet-18 (units chosen per stage) and WRN-40-2 -> WRN-16-1 (both)."""
    torch.manual_seed(0)
    teacher, student = _randomise_norms(build_model("resnet34", num_classes=10)), build_model("resnet18", num_classes=10)
    record = derive_student(teacher, student, (3, 64, 64))
    assert record.whole
    assert [u["kept"] for row in record.blocks for u in row.get("units", [])] == [[0, 2], [0, 3], [0, 5], [0, 2]]
    _strict_copy(student, "resnet18", num_classes=10)
    teacher, student = _randomise_norms(build_model("wrn_40_2")), build_model("wrn_16_1")
    x = torch.randn(4, 3, 32, 32)
    record = derive_student(teacher, student, (3, 32, 32), inputs=x)
    statuses = [row["status"] for row in record.blocks]
    assert statuses[0] == "fresh" and "reason" in record.blocks[0]
    assert statuses[1:] == ["units and channels chosen"] * 2
    # one channel set per residual stream: the shortcut and every unit's last conv keep the same channels
    plan = record.block_plans[1]
    by_path = {la.path: la for la in plan.layers}
    shortcut, last = by_path["layer.0.convShortcut"], by_path["layer.1.conv2"]
    assert torch.equal(shortcut.out_keep, last.out_keep)
    _strict_copy(student, "wrn_16_1")


@torch.no_grad()
def test_a_custom_model_through_the_block_api_and_an_underivable_pair():
    class Custom(nn.Module):
        def __init__(self, width: int, units: int):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
                                        for _ in range(units)])
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5))

        def forward(self, x):
            return self.head(self.body(self.stem(x)))

    teacher, student = Custom(16, 4).eval(), Custom(8, 2)
    record = derive_student(teacher, student, (3, 16, 16), teacher_blocks=["stem", "body", "head"],
                            student_blocks=["stem", "body", "head"])
    assert [row["status"] for row in record.blocks] == ["channels chosen", "units and channels chosen",
                                                         "channels chosen"]
    assert record.blocks[1]["units"][0]["kept"] == [0, 3]
    with pytest.raises(Underivable, match="blocks"):
        derive_student(build_model("resnet56"), build_model("resnet18_cifar"), (3, 32, 32))
    other = derive_student(build_model("resnet56"), build_model("resnet8"), (3, 32, 32))  # every block fresh
    assert other.fallback_reason == "the student is a ResNetRD, the teacher a ResNetCifarA: another model family"


@torch.no_grad()
def test_reestimate_batchnorm_gives_the_exact_batch_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))
    batches = [torch.randn(6, 3, 5, 5) for _ in range(3)]
    assert reestimate_batchnorm(model, batches) == 1
    features = torch.cat([model[0](b) for b in batches])
    mean = features.mean(dim=(0, 2, 3))
    var = features.var(dim=(0, 2, 3), unbiased=True)
    bn = model[1]
    assert not model.training and bn.momentum == 0.1
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    # the cumulative average of per-batch unbiased variances (PyTorch's definition with momentum=None)
    per_batch = torch.stack([model[0](b).var(dim=(0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_var, per_batch, rtol=1e-5, atol=1e-6)
    assert var.shape == per_batch.shape


@torch.no_grad()
def test_label_free_agreement_of_a_model_with_itself_and_a_pool_that_does_not_touch_training_randomness():
    model = build_model("digits_cnn").eval()
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    state = torch.random.get_rng_state()
    pool = agreement_pool(images, lambda x: x.float() / 255, None, views=2, mixed=True)
    assert torch.equal(state, torch.random.get_rng_state()) and len(pool) == 40
    same = agreement(model, model, pool)
    assert same["agreement"] == 100.0 and abs(same["kl"]) < 1e-6


@torch.no_grad()
def test_far_pool_is_deterministic_off_the_training_stream_and_farther_than_the_near_pool():
    from graftkd.engine.agreement import FAR_VIEWS, far_pool

    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    state = torch.random.get_rng_state()
    pool = far_pool(images, lambda x: x.float())
    assert torch.equal(state, torch.random.get_rng_state()) and pool.shape == (6 * FAR_VIEWS, 3, 16, 16)
    assert torch.equal(pool, far_pool(images, lambda x: x.float())) and not torch.equal(pool, far_pool(
        images, lambda x: x.float(), seed=1))
    # crops of at most half the area, resized back: every far view differs from the image it came from
    plain = (images.float() / 255).repeat(FAR_VIEWS, 1, 1, 1)
    assert float((pool - plain).abs().flatten(1).amax(1).min()) > 0.05


def test_patient_recipe_schedule_batches_and_mixing():
    recipe = Recipe(samples=64 * 100, warmup=0.1)
    assert recipe.steps == 100 and recipe.chunks == 2
    assert [round(recipe.lr_factor(s), 4) for s in (0, 9, 10, 55, 99)] == [0.1, 1.0, 1.0, 0.5, 0.0003]
    g = torch.Generator().manual_seed(0)
    batch = repeated_batch(10, 64, g, torch.device("cpu"))
    assert len(batch) == 64 and torch.bincount(batch, minlength=10).min() >= 6
    x = torch.rand(8, 3, 16, 16)
    mixed = mix_batch(x, "cutmix", 1.0, torch.Generator().manual_seed(3))
    again = mix_batch(x, "cutmix", 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(mixed, again) and not torch.equal(mixed, x)
    with pytest.raises(Exception, match="unknown recipe"):
        Recipe(name="lazy")


def test_imagenet_path_resnet34_to_resnet18_derives_grafts_and_merges_at_224px():
    """The torchvision layout at ImageNet size: units chosen per stage, grafting's stages from the derived
    start (norms frozen), and the exact merge into a plain ResNet-18 (random weights, a few steps)."""
    from graftkd.data.normalize import Normalizer
    from graftkd.graft import GraftConfig, ScheduleConfig, graft
    from graftkd.refine import derived_adapters

    torch.manual_seed(0)
    teacher = _randomise_norms(build_model("resnet34", num_classes=10))
    student = build_model("resnet18", num_classes=10)
    record = derive_student(teacher, student, (3, 224, 224))
    assert [u["kept"] for row in record.blocks for u in row.get("units", [])] == [[0, 2], [0, 3], [0, 5], [0, 2]]
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    config = GraftConfig(shots=1, batch_size=2, schedule=ScheduleConfig("imagenet", block_epochs=1, net_epochs=1),
                         inherit="none", freeze_norm_stats=True, augment=False, precision="fp32")
    result = graft(teacher, student, images, normalize=Normalizer((0.5,) * 3, (0.25,) * 3), config=config,
                   device="cpu", progress=False, init_adapters=lambda plan: derived_adapters(plan, record))
    assert result.merge_max_abs_diff <= 1e-4 and result.records
    _strict_copy(result.student, "resnet18", num_classes=10)


def test_imagenet_script_runs_on_a_fake_folder(tmp_path):
    """benchmarks/derived/imagenet_r34_r18.py end to end on 2 classes of odd-sized images at 64 px (CPU)."""
    import importlib.util
    import json
    from pathlib import Path

    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 3), ("val", 2)):
        for name in ("n01", "n02"):
            folder = tmp_path / "imagenet" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = 70 + 9 * i, 90 - 7 * i
                Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()).save(
                    folder / f"{i}.JPEG")
    teacher = tmp_path / "resnet34.pth"
    torch.save(build_model("resnet34", num_classes=2).state_dict(), teacher)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "derived" / "imagenet_r34_r18.py"
    spec = importlib.util.spec_from_file_location("imagenet_r34_r18", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "run"
    payload = module.main(["--imagenet", str(tmp_path / "imagenet"), "--teacher", str(teacher), "--k", "2",
                           "--size", "64", "--samples", "128", "--device", "cpu", "--precision", "fp32",
                           "--out", str(out)])
    assert payload["init"]["used"] == "derived" and payload["test"]["images"] == 4
    result = json.loads((out / "result.json").read_text())
    assert [row["status"] for row in result["derivation"]["blocks"]] == ["units chosen"] * 4


def test_unit_feature_pairs_map_each_kept_unit_to_the_teacher_stream_where_the_next_kept_unit_begins():
    """--unit-features: student unit j of a stage that took teacher units i_0 < i_1 < ... is matched to the
    teacher's output after unit i_{j+1} - 1 (the stage's last unit for the last one)."""
    from graftkd.refine import unit_pairs

    teacher, student = build_model("resnet32"), build_model("resnet20")
    record = derive_student(teacher, student, (3, 32, 32))
    pairs = unit_pairs(record)
    assert len(pairs) == 9
    t_names, s_names = dict(teacher.named_modules()), dict(student.named_modules())
    assert all(s in s_names and t in t_names for s, t in pairs)
    for path, chosen in record.depth.selections.items():
        mine = [t for s, t in pairs if s.startswith(f"{path}.")]
        assert mine[-1].endswith(f".{record.depth.lengths[path] - 1}")
        assert [int(t.rsplit(".", 1)[1]) for t in mine[:-1]] == [c - 1 for c in chosen[1:]]


def test_repair_on_augmented_views_regresses_on_more_rows_and_is_recorded() -> None:
    from graftkd.data import load_dataset
    from graftkd.graft import GraftConfig
    from graftkd.refine import DeriveOptions
    from graftkd.loaded import LoadedModel
    from graftkd.commands.distill import distill

    torch.manual_seed(0)
    teacher = build_model("digits_cnn").eval()
    fewshot = load_dataset("digits", "train").subset(list(range(20))).drop_labels()
    students = {}
    for views in (0, 3):
        payload = distill(teacher=LoadedModel(teacher, "digits_cnn", (0.0,), (1.0,), "test"),
                          student_arch="digits_cnn_half", fewshot=fewshot, test=None,
                          config=GraftConfig(shots=2, seed=0, precision="fp32"), device="cpu", out=None,
                          progress=False, derive=DeriveOptions(init="derived", refine="none", repair=True,
                                                               repair_views=views))
        assert payload["repair"]["applied"] and payload["repair"]["images"] == 20 * (1 + views)
        assert payload["derive"]["repair_views"] == views
        students[views] = payload
    assert students[0]["repair"]["per_layer"] != students[3]["repair"]["per_layer"]
    with pytest.raises(Exception, match="repair views and ridge"):
        DeriveOptions(repair=True, repair_views=-1)


def test_the_refinement_resolver_follows_the_derivation():
    from types import SimpleNamespace

    from graftkd.refine import HOT_TEMPERATURE
    from graftkd.refine import FADE, REPAIRED_ENOUGH, resolve_refinement

    def record(*statuses, whole=True):
        return SimpleNamespace(whole=whole, blocks=[{"block": i + 1, "status": s} for i, s in enumerate(statuses)],
                               depth=SimpleNamespace(selections={"layer1": [0]} if "units chosen" in statuses else {}),
                               fresh_blocks=[i for i, s in enumerate(statuses) if s == "fresh"])

    depth = resolve_refinement(record("units chosen", "units chosen"))
    assert (depth["repair"], depth["loss"], depth["stop_at"], depth["fade"]) == (False, "kd", None, FADE)
    assert depth["loss_options"] == {"temperature": HOT_TEMPERATURE} and "temperature 16" in depth["why"]
    from graftkd.refine import SYNTH, SYNTH_CHOICE

    assert depth["synth"] == SYNTH and depth["synth_choice"] == SYNTH_CHOICE
    assert resolve_refinement(record("inherited", "inherited"))["fade"] == 0.0
    width = resolve_refinement(record("inherited", "channels chosen", "units and channels chosen"))
    assert (width["repair"], width["loss"], width["stop_at"]) == (True, "feature_kd", REPAIRED_ENOUGH)
    assert width["fade"] == 0.0 and width["fade_below"] == FADE  # below the threshold: fading from the teacher
    assert width["loss_options"] == {"temperature": HOT_TEMPERATURE}
    from graftkd.refine import WIDTH_SYNTH_BUDGET

    assert width["synth"] == SYNTH and width["synth_budget"] == WIDTH_SYNTH_BUDGET and "synth_choice" not in width
    fresh = resolve_refinement(record("channels chosen", "fresh"))
    assert (fresh["repair"], fresh["loss"]) == (False, "kd") and "2" in fresh["why"] and "loss_options" not in fresh
    per_block = resolve_refinement(record("channels chosen", whole=False))  # the repair needs one whole derivation
    assert not per_block["repair"]


@torch.no_grad()
def test_fading_student_starts_as_the_teacher_and_ends_as_the_derived_student():
    from graftkd.derive.fade import FadingStudent

    torch.manual_seed(0)
    teacher, student = _randomise_norms(build_model("resnet32")), build_model("resnet20")
    record = derive_student(teacher, student, (3, 32, 32))
    fading = FadingStudent(teacher, record.depth, steps=3).eval()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(fading(x), teacher(x))  # a = 1: the whole teacher, exactly
    assert len(fading.faded) == 3 * 2 and fading.alpha == 1.0
    fading.train()
    with torch.enable_grad():
        for expected in (2 / 3, 1 / 3, 0.0):
            fading(x).sum().backward()
            assert fading.alpha == pytest.approx(expected)
    fading.eval()
    fading(x)  # evaluation does not advance the schedule
    assert fading.seen == 3
    plain = build_model("resnet20")
    plain.load_state_dict(fading.student_state_dict(plain), strict=True)
    torch.testing.assert_close(fading(x), plain.eval()(x))  # a = 0: the dropped units are gone
    # the step count travels with the state (checkpoints, resume, the loop's timing probe)
    again = FadingStudent(teacher, record.depth, steps=3)
    again.load_state_dict(fading.state_dict())
    assert again.seen == 3 and again.alpha == 0.0


class _Chain(nn.Module):
    """A plain chain of conv-BN-ReLU units, to derive units and channels at once."""

    def __init__(self, width: int, units: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
                                                  nn.ReLU()) for _ in range(units)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5))

    def forward(self, x):
        return self.head(self.body(self.stem(x)))

    def blocks(self):
        return [self.stem, self.body, self.head]

    def feature_paths(self):
        return ["stem", "body", "head"]


@pytest.mark.parametrize("pair", ["vgg", "units-and-channels", "mobilenet"])
def test_narrowing_student_starts_as_the_teacher_and_ends_as_the_derived_student(pair):
    from graftkd.derive.fade import NarrowingStudent

    torch.manual_seed(0)
    if pair == "vgg":
        teacher, student, arch = _randomise_norms(build_model("vgg16_bn")), build_model("vgg16_half_bn"), "vgg16_half_bn"
        build = lambda: build_model(arch)  # noqa: E731
    elif pair == "mobilenet":  # depthwise convolutions between the narrowed 1x1 layers
        teacher, student = _randomise_norms(build_model("mobilenetv2")), build_model("mobilenetv2_half")
        build = lambda: build_model("mobilenetv2_half")  # noqa: E731
    else:
        teacher, student = _randomise_norms(_Chain(16, 4)), _Chain(8, 2)
        build = lambda: _Chain(8, 2)  # noqa: E731
    record = derive_student(teacher, student, (3, 32, 32))
    assert record.whole and record.width.narrowed()
    from graftkd.refine import _feature_channels

    paths = student.feature_paths()[:-1]
    kept = _feature_channels(student, record)
    narrowing = NarrowingStudent(teacher, student, record, steps=2, taps={p: kept.get(p) for p in paths}).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(narrowing(x), teacher(x))  # a = 1: the whole teacher
    assert narrowing.readers and (pair != "units-and-channels" or narrowing.faded == ["body.1", "body.2"])
    narrowing.train()
    optimizer = torch.optim.SGD([p for p in narrowing.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    for _ in range(4):  # two fading steps, then two as the narrow student (slices of the same parameters)
        narrowing(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert narrowing.alpha == 0.0 and int(narrowing.switched) == 1
    plain = build()
    plain.load_state_dict(narrowing.student_state_dict(plain), strict=True)
    narrowing.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(narrowing(x), plain(x))  # the trained narrow student, exactly
    features, taps = {}, {}
    for i, path in enumerate(paths):  # the taps see the student's own stage outputs, channel for channel
        narrowing.get_submodule(f"taps.{i}").register_forward_hook(
            lambda m, i_, o, name=f"taps.{i}": features.__setitem__(name, o))
        plain.get_submodule(path).register_forward_hook(lambda m, i_, o, name=f"taps.{i}": taps.__setitem__(name, o))
    with torch.no_grad():
        narrowing(x), plain(x)
    assert len(taps) == len(paths) and all(torch.equal(taps[k], features[k]) for k in taps)
    assert narrowing.tap_channels and all(len(v) == features[k].shape[1] for k, v in narrowing.tap_channels.items())
    # the step count and the switch travel with the state (checkpoints, resume)
    again = NarrowingStudent(teacher, student, record, steps=2)
    again.load_state_dict(narrowing.state_dict())
    assert again.seen == 4 and int(again.switched) == 1


def _resnet_distill(config: dict, samples: int = 8 * 4, pair=("resnet32", "resnet20"), **derive):
    """``distill`` of a random-weight ResNet-32 into a ResNet-20 (or ``pair``) on 10 random images (batches of 8).

    Two inversion steps and 2 far views per image: these tests check what a run makes and records; how good the
    synthetic images are is the grid's business, and the far pool has its own test."""
    import functools
    from unittest import mock

    from graftkd.data.dataset import ImageSet
    from graftkd.engine import agreement
    from graftkd.engine.recipe import Recipe
    from graftkd.graft import GraftConfig
    from graftkd.refine import DeriveOptions
    from graftkd.loaded import LoadedModel
    from graftkd.commands.distill import distill

    torch.manual_seed(0)
    teacher = _randomise_norms(build_model(pair[0]))
    g = torch.Generator().manual_seed(1)
    fewshot = ImageSet(torch.randint(0, 256, (10, 3, 32, 32), generator=g, dtype=torch.uint8),
                       torch.arange(10), [str(i) for i in range(10)], "random", dataset="cifar10").drop_labels()
    recipe = Recipe(samples=samples, batch_size=8, steps_per_chunk=2, synth_steps=2)
    with mock.patch.object(agreement, "far_pool", functools.partial(agreement.far_pool, views=2)):
        return distill(teacher=LoadedModel(teacher, pair[0], (0.5,) * 3, (0.25,) * 3, "test"),
                       student_arch=pair[1], fewshot=fewshot, test=None, config=GraftConfig(shots=1, seed=0, **config),
                       device="cpu", out=None, progress=False,
                       derive=DeriveOptions(init="derived", **derive, recipe=recipe))


def test_fade_refines_a_depth_derivation_through_distill_and_is_recorded(monkeypatch):
    from graftkd.refine import DeriveOptions

    payload = _resnet_distill({"precision": "auto", "compile": "on"}, refine="kd", fade=0.5)
    assert payload["fade"]["steps"] == 2 and len(payload["fade"]["faded_units"]) == 6
    assert payload["derive"]["fade"] == 0.5 and payload["bn_start"]["used"] == "teacher"
    compile_facts = payload["refine"]["compile"]  # asked for, but the fading student stays eager, and says why
    assert not compile_facts["used"] and "fade" in compile_facts["why"]
    # the default refinement fades a depth derivation's units over FADE of the budget, and says so
    from graftkd.refine import FADE

    auto = _resnet_distill({"precision": "fp32"}, samples=8 * 8, refine="auto")
    assert auto["resolved"]["fade"] == FADE and auto["derive"]["fade"] == FADE and "fading" in auto["resolved"]["why"]
    assert auto["fade"]["steps"] == round(FADE * 8)
    # ... with KD at the hot temperature, recorded; a temperature the user sets wins
    from graftkd.refine import HOT_TEMPERATURE

    assert auto["derive"]["loss_options"] == {"temperature": HOT_TEMPERATURE}
    assert auto["refine"]["stages"][0]["name"] == "kd" and f"temperature {HOT_TEMPERATURE:g}" in auto["resolved"]["why"]
    # ... with no synthetic images at so small a budget, and with them where the budget allows (scaled down here)
    import graftkd.refine as refine

    assert auto["derive"]["recipe"]["synth"] == 0 and auto["synth"] is None and "no synthetic" in auto["resolved"]["why"]
    monkeypatch.setattr(refine, "SYNTH_SAMPLES_PER_IMAGE", 16)
    made = _resnet_distill({"precision": "fp32"}, samples=8 * 8, refine="auto")
    assert made["derive"]["recipe"]["synth"] == 4 and made["synth"]["made"] == 4 and made["resolved"]["synth"] == 4
    assert "4 images synthesised" in made["resolved"]["why"]
    # the greedy units chosen on the few-shot images plus synthetic ones, when asked: recorded, the record replaced
    chosen = _resnet_distill({"precision": "fp32"}, samples=8 * 8, refine="auto", synth_choice=3)
    assert chosen["derive"]["choice_images"] == {"few_shot": 10, "synthetic": 3} and chosen["derive"]["synth_choice"] == 3
    assert "3 synthetic ones" in chosen["resolved"]["why"] and chosen["derivation"]["depth_rule"] == "greedy"
    # the default path chooses on the synthetic images too (all 4 made here); --synth-choice 0 keeps to the real ones
    assert made["derive"]["synth_choice"] == refine.SYNTH_CHOICE
    assert made["derive"]["choice_images"] == {"few_shot": 10, "synthetic": 4}
    # (one run for both: the real images only, and a temperature the user sets)
    real = _resnet_distill({"precision": "fp32"}, samples=8 * 8, refine="auto", synth_choice=0,
                           loss_options={"temperature": 2.0})
    assert real["derive"]["synth_choice"] == 0 and "choice_images" not in real["derive"] and real["synth"]["made"] == 4
    assert real["derive"]["loss_options"] == {"temperature": 2.0}
    # the default path chooses the units greedily by few-shot logit error; a named refinement keeps them even
    assert auto["init"]["depth_rule"]["used"] == "greedy" and auto["derivation"]["depth_rule"] == "greedy"
    assert payload["init"]["depth_rule"] == {"requested": "auto", "used": "even",
                                             "why": "auto: a named refinement keeps evenly spaced units"}
    with pytest.raises(Exception, match="fade"):
        DeriveOptions(fade=0.5, repair=True)
    with pytest.raises(Exception, match="fade"):
        DeriveOptions(fade=1.5)


def test_fade_with_feature_kd_matches_the_teachers_stage_outputs():
    from graftkd.refine import DeriveOptions

    payload = _resnet_distill({"precision": "fp32"}, refine="kd", fade=0.5, loss="feature_kd")
    (stage,) = payload["refine"]["stages"]
    # the teacher's stage outputs are matched at the fading student's own paths ("net.layer1", ...)
    assert payload["fade"]["steps"] == 2 and stage["loss_terms"]["features"] > 0
    assert payload["derive"]["loss"] == "feature_kd"
    with pytest.raises(Exception, match="fade"):
        DeriveOptions(fade=0.5, loss="feature_kd", unit_features=True)


def test_fade_narrows_a_width_derivation_through_distill_with_the_kept_stage_outputs():
    payload = _resnet_distill({"precision": "fp32"}, refine="kd", fade=0.5, loss="feature_kd",
                              pair=("vgg16_bn", "vgg16_half_bn"))
    (stage,) = payload["refine"]["stages"]
    assert payload["fade"]["steps"] == 2 and len(payload["fade"]["faded_readers"]) == 13  # 12 convs and the head
    assert payload["fade"]["faded_units"] == [] and stage["loss_terms"]["features"] > 0
    assert payload["bn_start"]["used"] == "teacher" and payload["derivation"]["whole"]


def test_kept_slices_have_the_gradient_of_index_select():
    from graftkd.derive.fade import _Kept

    g = torch.Generator().manual_seed(0)
    value = torch.randn(6, 5, 3, 3, generator=g, requires_grad=True)
    rows, columns = torch.tensor([0, 2, 5]), torch.tensor([1, 4])
    weight = torch.randn(6, 5, 3, 3, generator=g)
    for r, c in ((rows, columns), (rows, None), (None, columns)):
        expected = value if r is None else value.index_select(0, r)
        expected = expected if c is None else expected.index_select(1, c)
        (want,) = torch.autograd.grad((expected * weight[: expected.shape[0], : expected.shape[1]]).sum(), value)
        kept = _Kept.apply(value, r, c)
        (got,) = torch.autograd.grad((kept * weight[: kept.shape[0], : kept.shape[1]]).sum(), value)
        assert torch.equal(kept, expected) and torch.equal(got, want)


@pytest.mark.parametrize("rule", DEPTH_RULES)
@pytest.mark.parametrize("pair", [("vgg16_bn", "vgg16", 5), ("vgg13", "vgg8", 4)])
def test_norms_and_activations_are_never_left_out_to_make_a_student_fit(rule, pair) -> None:
    # VGG16 without BatchNorm has the layer pattern of VGG16-BN with its norms left out; RepDistiller's VGG-8 block
    # (conv, BN) is VGG-13's (conv, BN, ReLU, conv, BN) with three layers left out: in both a choice of layers
    # existed (before, VGG-13's first conv and its second BN), but that network is not a part of the teacher
    teacher_arch, student_arch, blocks = pair
    teacher, student = _randomise_norms(build_model(teacher_arch)), build_model(student_arch)
    record = derive_student(teacher, student, (3, 32, 32), depth_rule=rule, inputs=torch.randn(4, 3, 32, 32))
    assert not record.whole and record.fresh_blocks[:blocks] == list(range(blocks))
    for reason in [record.fallback_reason] + [row["reason"] for row in record.blocks[:blocks]]:
        assert "never left out" in reason or "never a normalisation layer or an activation" in reason, reason


def test_only_units_with_weights_of_their_own_may_be_left_out() -> None:
    from graftkd.derive.depth import droppable

    assert droppable(nn.Conv2d(4, 4, 3)) and droppable(build_model("resnet20").layer1[0])
    assert droppable(nn.Identity())  # leaving it out changes nothing
    assert not any(droppable(m) for m in (nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.LayerNorm(4), nn.ReLU(),
                                          nn.MaxPool2d(2), nn.Dropout()))


def _zero_dropped_readers(teacher: nn.Module, record) -> nn.Module:
    """A copy of ``teacher`` in which no layer reads a channel the derivation dropped: the derived student must
    then compute its logits exactly (a check of every channel choice and copy, whatever the rule chose)."""
    exact = copy.deepcopy(teacher)
    for la in record.width.layers:
        if la.kind not in ("depthwise", "grouped") and len(la.in_keep) < la.teacher_in:
            dropped = torch.ones(la.teacher_in, dtype=torch.bool)
            dropped[la.in_keep] = False
            weight = exact.get_submodule(la.path).weight
            if weight.shape[1] == la.teacher_in:
                weight[:, dropped] = 0.0
            else:  # a linear layer reading a flattened map: each channel's positions together
                weight.view(weight.shape[0], la.teacher_in, -1)[:, dropped] = 0.0
    return exact


@torch.no_grad()
@pytest.mark.parametrize("pair", [("vgg16_bn", "vgg16_half_bn"), ("vgg16_bn", "vgg16_graft_bn"),
                                  ("vgg16", "vgg16_half"), ("mobilenetv2", "mobilenetv2_half")])
def test_a_width_derivation_computes_the_teacher_whose_dropped_channels_are_not_read(pair) -> None:
    """With the dropped channels' reading weights zeroed in the teacher, the derived student computes the teacher's
    logits. MobileNetV2: a depthwise conv acts per channel, so it keeps the channels of the expansion before it."""
    from graftkd.derive.width import load_narrowed

    torch.manual_seed(0)
    teacher, student = _randomise_norms(build_model(pair[0])), build_model(pair[1])
    record = derive_student(teacher, student, (3, 32, 32))
    assert record.whole and record.width.narrowed()
    _strict_copy(student, pair[1])
    exact = _zero_dropped_readers(teacher, record)
    load_narrowed(exact, student, record.width)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(student.eval()(x), exact(x), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_depthwise_layers_take_their_channels_and_the_repair_leaves_them_alone() -> None:
    from graftkd.derive.repair import repair

    torch.manual_seed(0)
    teacher, student = _randomise_norms(build_model("mobilenetv2")), build_model("mobilenetv2_half")
    record = derive_student(teacher, student, (3, 32, 32))
    depthwise = [la for la in record.width.layers if la.kind == "depthwise"]
    assert depthwise and all(len(la.in_keep) == la.teacher_in == 1 for la in depthwise)
    for la in depthwise:
        assert teacher.get_submodule(la.path).groups == teacher.get_submodule(la.path).in_channels
        assert len(la.out_keep) == student.get_submodule(la.path).out_channels
    # the repair corrects the layers around the filters per channel and leaves those alone
    done = repair(teacher, student, record, torch.randn(16, 3, 32, 32))
    assert done["applied"] and done["logit_rel_error_after"] < done["logit_rel_error_before"]
    assert not {row["layer"] for row in done["per_layer"]} & {la.path for la in depthwise}


@torch.no_grad()
def test_every_zoo_model_derives_from_itself_exactly() -> None:
    """The identity pair is the strictest check of the walk and the channel spaces: every block inherited, the
    teacher's logits exactly (ShuffleNetV1's grouped convolutions included: their channels are kept whole)."""
    from graftkd.models import list_models

    deeper = {"resnet110", "resnet110_b", "wrn_40_1", "wrn_40_2"}  # resnet56(_b) and wrn_16_* stand for them
    for arch in list_models():
        if arch == "hybrid" or arch in deeper:
            continue
        torch.manual_seed(0)
        teacher, student = _randomise_norms(build_model(arch)), build_model(arch)
        shape = (3, 64, 64) if arch in ("resnet18", "resnet34") else tuple(getattr(teacher, "input_shape", (3, 32, 32)))
        record = derive_student(teacher, student, shape)
        assert record.whole and {row["status"] for row in record.blocks} == {"inherited"}, (arch, record.fallback_reason)
        x = torch.randn(2, *shape)
        assert torch.equal(student.eval()(x), teacher(x)), arch
