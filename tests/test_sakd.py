"""Spot-adaptive KD: sampler, policy init, routing network, agent step, masked losses, a tiny run."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from graftkd.distill.sakd import (
    RoutingNetwork,
    SpotAdaptive,
    SpotPolicy,
    gumbel_straight_through,
    masked_student_terms,
    same_family,
)
from graftkd.distill.losses import kd_loss
from graftkd.models.base import BlockModel, check_stage_contract


class TinyStaged(BlockModel):
    """f0 stem, f1, f2 (stride 2), f3 pooled embedding, then the classifier."""

    input_shape = (3, 8, 8)

    def __init__(self, widths=(4, 6, 8), num_classes: int = 4) -> None:
        super().__init__()
        a, b, c = widths
        self.stem, self.stem_relu = nn.Conv2d(3, a, 3, padding=1), nn.ReLU()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(b, c, 3, stride=2, padding=1), nn.ReLU()
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc = nn.Linear(c, num_classes)

    def stage_parts(self):
        return [[self.stem, self.stem_relu], [self.conv1, self.bn1, self.relu1], [self.conv2, self.relu2],
                [self.pool, self.flatten], [self.fc]]

    def stage_names(self):
        return ["stem", "layer1", "layer2", "embedding", "fc"]

    def block_parts(self):
        parts = self.stage_parts()
        return [parts[0] + parts[1], parts[2] + parts[3] + parts[4]]

    def block_names(self):
        return ["stem+layer1", "layer2+head"]


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    return TinyStaged((4, 6, 8)), TinyStaged((6, 8, 12)).eval()


def test_tiny_model_follows_the_stage_contract() -> None:
    shapes = check_stage_contract(TinyStaged(), torch.randn(2, 3, 8, 8))
    assert [tuple(s[1:]) for s in shapes] == [(4, 8, 8), (6, 8, 8), (8, 4, 4), (8,)]


def test_straight_through_sampler_is_one_hot_exact_categorical_with_soft_gradients() -> None:
    generator = torch.Generator().manual_seed(0)
    p = 0.3
    logits = torch.tensor([[math.log(p), math.log(1 - p)]]).repeat(20000, 1).requires_grad_(True)
    sample = gumbel_straight_through(logits, tau=5.0, generator=generator)
    assert torch.equal(sample.detach().sum(dim=1), torch.ones(20000))
    assert set(sample.detach().unique().tolist()) == {0.0, 1.0}
    assert abs(sample[:, 0].detach().mean().item() - p) < 0.015  # argmax of Gumbel-perturbed logits ~ softmax
    (sample[:, 0] * torch.arange(20000.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_homo_policy_starts_by_distilling_everywhere_without_an_autograd_error() -> None:
    torch.manual_seed(0)
    plain = SpotPolicy(8, 6, 3, homo=False)
    torch.manual_seed(0)
    homo = SpotPolicy(8, 6, 3, homo=True)
    assert torch.allclose(homo.linear.bias[0::2], plain.linear.bias[0::2] + 10)
    assert torch.equal(homo.linear.bias[1::2], plain.linear.bias[1::2]) and homo.linear.bias.requires_grad
    logits = homo(torch.randn(32, 8), torch.randn(32, 6))
    assert logits.shape == (32, 3, 2)
    decisions = gumbel_straight_through(logits, 5.0, torch.Generator().manual_seed(1))
    assert decisions[..., 0].mean() > 0.99
    assert same_family("resnet56", "resnet20") and same_family("resnet32x4", "resnet8x4")
    assert not same_family("resnet32x4", "resnet32") and not same_family("vgg13", "mobilenetv2")


def test_routing_all_teacher_is_the_teacher_and_all_student_is_the_student() -> None:
    student, teacher = _pair()
    student.eval()
    spots = [(1, 1), (2, 2)]
    router = RoutingNetwork(spots, [(6, 8, 8), (8, 4, 4)], [(8, 8, 8), (12, 4, 4)]).eval()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(router(x, student, teacher, torch.ones(5, 3)), teacher(x), atol=1e-6)
        assert torch.allclose(router(x, student, teacher, torch.zeros(5, 3)), student(x), atol=1e-6)
        mixed = router(x, student, teacher, torch.tensor([[1.0, 1.0, 1.0]] * 2 + [[0.0, 0.0, 0.0]] * 3))
        assert torch.allclose(mixed[:2], teacher(x)[:2], atol=1e-6) and torch.allclose(mixed[2:], student(x)[2:], atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 5, 4, 4), (6, 7)])
def test_the_switch_is_the_products_it_replaces_in_value_and_gradient(shape) -> None:
    """``switch(a, t, h)`` is ``a * t + (1 - a) * h`` for straight-through decisions, bit for bit in fp32 (output,
    and the gradients of the decisions, ``t`` and ``h``); a bf16 pair stays bf16 (the products made it fp32) with
    the same output and nearly the same decision gradient (accumulated in fp32)."""
    from graftkd.distill.sakd import switch

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(shape[0], 2, generator=g, requires_grad=True)
    upstream = torch.randn(shape, generator=g)

    def grads(fn, dtype):
        t = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(dtype).requires_grad_(True)
        h = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype).requires_grad_(True)
        logits.grad = None
        a = gumbel_straight_through(logits, 5.0, torch.Generator().manual_seed(6))[:, 0]
        assert 0 < a.sum() < shape[0]  # both streams chosen somewhere
        out = fn(a, t, h)
        (out.float() * upstream).sum().backward()
        return out, logits.grad.clone(), t.grad, h.grad

    def products(a, t, h):
        a = a.view(-1, *([1] * (t.dim() - 1)))
        return a * t + (1 - a) * h

    for got, want in zip(grads(switch, torch.float32), grads(products, torch.float32)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    out, logit_grad, t_grad, h_grad = grads(switch, torch.bfloat16)
    ref_out, ref_logit_grad, ref_t_grad, ref_h_grad = grads(products, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and ref_out.dtype == torch.float32  # the products promote; the switch keeps
    assert torch.equal(out.float(), ref_out) and torch.equal(t_grad, ref_t_grad) and torch.equal(h_grad, ref_h_grad)
    assert torch.allclose(logit_grad, ref_logit_grad, rtol=2e-2, atol=1e-4) and logit_grad.abs().sum() > 0


def test_agent_step_trains_policy_and_adapters_but_never_the_student() -> None:
    student, teacher = _pair()
    student.train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    agent = SpotAdaptive([(1, 1), (2, 2)], [(6, 8, 8), (8, 4, 4)], [(8, 8, 8), (12, 4, 4)], 8, 12, homo=False)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))
    logits = student(x)
    loss, masks = agent.agent_step(x, y, student, teacher, logits, torch.randn(6, 8), torch.randn(6, 12),
                                   torch.Generator().manual_seed(0))
    loss.backward()
    assert masks.shape == (6, 3) and masks.dtype == torch.bool and not masks.requires_grad
    assert agent.policy.linear.weight.grad is not None and agent.policy.linear.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.router.parameters())
    assert all(p.grad is None for p in student.parameters())  # its weights were never in the graph
    assert student.training and all(p.requires_grad for p in student.parameters())
    anti = SpotAdaptive([(1, 1), (2, 2)], [(6, 8, 8), (8, 4, 4)], [(8, 8, 8), (12, 4, 4)], 8, 12, homo=True, anti=True)
    _, anti_masks = anti.agent_step(x, y, student, teacher, student(x), torch.randn(6, 8), torch.randn(6, 12),
                                    torch.Generator().manual_seed(0))
    assert not anti_masks.any()  # homo policy distils everywhere, so the anti masks select nobody


class _MeanSquare:
    """A two-spot distiller stand-in: mean squared difference per spot."""

    name = "msq"
    spot_kind = "stages"

    def spot_losses(self, s, t):
        return [(a - b).pow(2).mean() for a, b in zip(s, t)]


def test_masked_terms_reduce_to_standard_kd_and_to_zero() -> None:
    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(8, 5, requires_grad=True), torch.randn(8, 5)
    s_feats, t_feats = [torch.randn(8, 3), torch.randn(8, 2)], [torch.randn(8, 3), torch.randn(8, 2)]
    all_on = torch.ones(8, 3, dtype=torch.bool)
    terms = masked_student_terms(all_on, _MeanSquare(), 2.0, 1.0, 4.0, s_logits, t_logits, s_feats, t_feats)
    assert torch.allclose(terms["kd"], kd_loss(s_logits, t_logits, 4.0), atol=1e-6)
    expected = 2.0 * sum((a - b).pow(2).mean() for a, b in zip(s_feats, t_feats))
    assert torch.allclose(terms["msq"], expected, atol=1e-6)
    none = masked_student_terms(torch.zeros(8, 3, dtype=torch.bool), _MeanSquare(), 2.0, 1.0, 4.0, s_logits,
                                t_logits, s_feats, t_feats)
    assert float(none["kd"].detach()) == 0.0 and float(none["msq"].detach()) == 0.0
    half = torch.zeros(8, 3, dtype=torch.bool)
    half[:4, 0] = half[2:6, 2] = True
    terms = masked_student_terms(half, _MeanSquare(), 1.0, 1.0, 4.0, s_logits, t_logits, s_feats, t_feats)
    assert torch.allclose(terms["kd"], kd_loss(s_logits[2:6], t_logits[2:6], 4.0) * 4 / 8, atol=1e-6)
    assert torch.allclose(terms["msq"], (s_feats[0][:4] - t_feats[0][:4]).pow(2).mean() * 4 / 8, atol=1e-6)


@pytest.mark.parametrize("adaptive", ["sakd", "anti"])
def test_a_tiny_spot_adaptive_run_logs_policy_statistics(adaptive) -> None:
    from graftkd.data.normalize import Normalizer
    from graftkd.distill.fulldata import KDRecipe, train_kd

    student, teacher = _pair()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 4, (64,), generator=generator)
    recipe = KDRecipe(epochs=2, batch_size=16, lr=0.05, milestones=[1], precision="fp32", eval_every=0, padding=1,
                      distiller="at", adaptive=adaptive, homo=False)
    before = [p.detach().clone() for p in student.parameters()]
    result = train_kd(student, teacher, (images, labels), normalize=Normalizer((0.5,) * 3, (0.25,) * 3),
                      recipe=recipe, device=torch.device("cpu"), student_arch="tiny", teacher_arch="tiny",
                      test=(images[:16], labels[:16]), progress=False)
    fractions = [h["policy_fraction"] for h in result["history"]]
    assert len(fractions) == 2 and all(len(f) == 3 and all(0.0 <= v <= 1.0 for v in f) for f in fractions)
    assert result["routing_spots"] == [[1, 1], [2, 2]] and result["adaptive"] == adaptive
    assert all(math.isfinite(v) for h in result["history"] for v in h["loss"].values())
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_sakd_whose_policy_distils_everywhere_trains_the_student_exactly_like_standard_kd() -> None:
    import copy

    from graftkd.data.normalize import Normalizer
    from graftkd.distill.fulldata import KDRecipe, train_kd

    student, teacher = _pair()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 4, (64,), generator=generator)
    weights = {}
    for mode in ("none", "sakd"):  # homo: +10 on every "distil" logit, so every decision is 1
        trained = copy.deepcopy(student)
        recipe = KDRecipe(epochs=2, batch_size=16, lr=0.05, milestones=[1], precision="fp32", eval_every=0,
                          padding=1, distiller="at", adaptive=mode, homo=True)
        train_kd(trained, copy.deepcopy(teacher), (images, labels), normalize=Normalizer((0.5,) * 3, (0.25,) * 3),
                 recipe=recipe, device=torch.device("cpu"), progress=False, student_arch="t", teacher_arch="t")
        weights[mode] = trained.state_dict()
    assert all(torch.equal(weights["none"][k], weights["sakd"][k]) for k in weights["none"])


def _sakd_run(monkeypatch=None, reuse: bool = True, agent_every: int = 1, calls: list | None = None,
              precision: str = "fp32", adapter_dtypes: list | None = None):
    from graftkd.data.normalize import Normalizer
    from graftkd.distill import fulldata
    from graftkd.distill.fulldata import KDRecipe, train_kd

    student, teacher = _pair()
    if calls is not None:
        original = teacher.run_stages
        teacher.run_stages = lambda x, begin, end: calls.append((begin, end)) or original(x, begin, end)
    if not reuse or adapter_dtypes is not None:
        build = fulldata._build_adaptive

        def patched(*args, **kwargs):
            agent, s_paths, t_paths = build(*args, **kwargs)
            if not reuse:
                agent.first_teacher_spot = None
            if adapter_dtypes is not None:
                agent.router.hint[0].register_forward_hook(lambda m, i, out: adapter_dtypes.append(out.dtype))
            return agent, s_paths, t_paths

        monkeypatch.setattr(fulldata, "_build_adaptive", patched)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 4, (64,), generator=generator)
    recipe = KDRecipe(epochs=2, batch_size=16, lr=0.05, milestones=[1], precision=precision, eval_every=0, padding=1,
                      distiller="at", adaptive="sakd", homo=False, agent_every=agent_every)
    result = train_kd(student, teacher, (images, labels), normalize=Normalizer((0.5,) * 3, (0.25,) * 3),
                      recipe=recipe, device=torch.device("cpu"), student_arch="tiny", teacher_arch="tiny",
                      progress=False)
    return student.state_dict(), result


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_routing_pass_reads_the_teachers_first_segment_from_the_step_and_changes_nothing(monkeypatch,
                                                                                             precision) -> None:
    """The teacher's output at the first routing spot is taken from the step's own teacher pass (the tapped
    feature, in the dtype that pass made it) instead of being computed again; the trained student is
    bit-identical either way, in fp32 and in bf16."""
    calls: list = []
    shared, _ = _sakd_run(calls=calls, precision=precision)
    assert calls and all(begin > 0 for begin, _ in calls)  # never the prefix from the input again
    recomputed, _ = _sakd_run(monkeypatch, reuse=False, precision=precision)
    assert all(torch.equal(shared[k], recomputed[k]) for k in shared)


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_routing_pass_runs_in_the_steps_precision(monkeypatch, precision, dtype) -> None:
    """A bf16 run routes in bf16 too (the routing pass is most of SAKD's extra cost); fp32 stays fp32."""
    dtypes: list = []
    _sakd_run(monkeypatch, precision=precision, adapter_dtypes=dtypes)
    assert dtypes and set(dtypes) == {dtype}


def test_agent_every_two_routes_half_the_steps_and_still_decides_every_step() -> None:
    calls: list = []
    _, every = _sakd_run(calls=calls)
    calls_half: list = []
    _, half = _sakd_run(agent_every=2, calls=calls_half)
    assert len(calls_half) * 2 == len(calls)  # 8 steps: 4 routing passes instead of 8
    assert all(len(h["policy_fraction"]) == 3 for h in half["history"])
    with pytest.raises(Exception, match="agent_every"):
        _sakd_run(agent_every=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_speed_benchmark_times_the_routing_pass_floor_beside_both_steps(tmp_path, precision) -> None:
    """``benchmarks/sakd_speed.py`` on two small zoo models: the floor is the standard step plus the routing
    pass's parts, each part costs something, the payload written is the one returned, and it says which
    precision the steps and the parts ran in."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sakd_speed.py"
    spec = importlib.util.spec_from_file_location("sakd_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        out = bench.main(["--teacher", "wrn_16_2", "--student", "resnet8", "--classes", "10", "--batch-size", "8",
                          "--steps", "1", "--rounds", "1", "--threads", "1", "--precision", precision,
                          "--out", str(tmp_path / "s.json")])
    finally:
        torch.set_num_threads(threads)
    parts = out["routing_parts_seconds_per_image"]
    assert set(parts) == {"teacher_vjp", "student_vjp", "adapters"} and all(v > 0 for v in parts.values())
    standard = 1 / out["images_per_second"]["standard"]
    assert out["floor_over_standard"] == pytest.approx(1 + sum(parts.values()) / standard)
    assert out["sakd_over_floor"] == pytest.approx(out["sakd_over_standard"] / out["floor_over_standard"])
    assert json.loads((tmp_path / "s.json").read_text())["floor_over_standard"] == out["floor_over_standard"]
    assert out["setting"] == {"precision": precision, "channels_last": False}
