"""Synthetic training images from the teacher's BatchNorm statistics (graftkd.engine.inversion)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from graftkd.data.normalize import Normalizer
from graftkd.engine.inversion import Inversion, batch_gap, invert_batchnorm
from graftkd.errors import GraftkdError


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    from graftkd.engine.bn import reestimate_batchnorm

    # the statistics of other images than the ones below (darker, smoother): reachable, but not where they start
    other = torch.nn.functional.avg_pool2d(torch.rand(64, 3, 12, 12) * 0.4, 3, stride=1, padding=1)
    reestimate_batchnorm(net, [(other - 0.5) / 0.25])
    return net.eval()


def _images(n: int = 6) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 12, 12), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_inversion_moves_batches_towards_the_running_statistics_and_leaves_the_model_as_it_was():
    net, norm = _net(), Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    made, record = invert_batchnorm(net, norm, _images(), Inversion(10, steps=30, batch_size=5, lr=0.1),
                                    generator=torch.Generator().manual_seed(0), num_classes=5)
    assert made.dtype == torch.uint8 and made.shape == (10, 3, 12, 12) and record["made"] == 10
    firsts = [r["bn"] for r in record["log"] if r["step"] == 0]
    lasts = [r["bn"] for r in record["log"] if r["step"] == 29]
    assert len(firsts) == len(lasts) == 2 and all(b < a * 0.8 for a, b in zip(firsts, lasts)), record["log"]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing trained, stats kept
    assert not net.training and all(p.requires_grad for p in net.parameters())
    assert all(not m._forward_hooks for m in net.modules())
    again, _ = invert_batchnorm(net, norm, _images(), Inversion(10, steps=30, batch_size=5, lr=0.1),
                                generator=torch.Generator().manual_seed(0), num_classes=5)
    assert torch.equal(made, again)  # the generator decides every draw


def test_a_long_batch_says_where_it_is_and_the_images_do_not_depend_on_it(monkeypatch):
    import graftkd.engine.inversion as inversion

    net, norm = _net(), Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    spec = Inversion(4, steps=4, batch_size=2, lr=0.1)
    quiet, _ = invert_batchnorm(net, norm, _images(), spec, generator=torch.Generator().manual_seed(0), num_classes=5)
    monkeypatch.setattr(inversion, "REPORT_EVERY_S", 0.0)  # every step between the first and the last
    lines: list[str] = []
    made, _ = invert_batchnorm(net, norm, _images(), spec, generator=torch.Generator().manual_seed(0), num_classes=5,
                               report=lines.append)
    steps = [line.split(" (")[0] for line in lines if "step" in line]
    assert steps == [f"synthetic images: batch {b}/2, step {s}/4" for b in (1, 2) for s in (2, 3)], lines
    assert [line.split(" (")[0] for line in lines if "step" not in line] == ["synthetic images: 2/4",
                                                                             "synthetic images: 4/4"]
    assert torch.equal(made, quiet)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_batch_gap_is_the_gap_of_the_batch_statistics_in_value_and_gradient(memory_format):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 3, 5, 6, generator=g) * 2 + 1).contiguous(memory_format=memory_format).requires_grad_(True)
    mean, var = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 3.0, 0.5])
    # golden value: the statistics over dims (0, 2, 3), biased variance, as BatchNorm measures them
    ref = x.detach().clone().requires_grad_(True)
    expected = (torch.linalg.vector_norm(ref.mean(dim=(0, 2, 3)) - mean)
                + torch.linalg.vector_norm(ref.var(dim=(0, 2, 3), unbiased=False) - var))
    got = batch_gap(x, mean, var)
    assert torch.allclose(got, expected, rtol=1e-6)
    got.backward()
    expected.backward()
    assert torch.allclose(x.grad, ref.grad, rtol=1e-5, atol=1e-7)
    assert float(batch_gap(torch.zeros(2, 1, 2, 2), torch.tensor([3.0]), torch.tensor([4.0]))) == 7.0


@pytest.mark.parametrize("shape, dims", [((6, 3), (0,)), ((6, 3, 4), (0, 2))])
def test_batch_gap_reads_what_a_batchnorm1d_reads(shape, dims):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 3 - 1
    mean, var = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 3.0, 0.5])
    expected = (torch.linalg.vector_norm(x.mean(dim=dims) - mean)
                + torch.linalg.vector_norm(x.var(dim=dims, unbiased=False) - var))
    assert torch.allclose(batch_gap(x, mean, var), expected, rtol=1e-6)


def test_a_teacher_with_batchnorm1d_in_its_classifier_inverts():
    # VGG16-BN's classifier: Linear, BatchNorm1d, ReLU; the inversion matches its statistics as a conv's
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5))
    with torch.no_grad():
        net(torch.randn(16, 3, 8, 8) * 0.25)
    norm = Normalizer((0.5,) * 3, (0.25,) * 3)
    made, record = invert_batchnorm(net.eval(), norm, _images(), Inversion(4, steps=3, batch_size=2),
                                    generator=torch.Generator().manual_seed(0), num_classes=5)
    assert made.shape[0] == 4 and made.dtype == torch.uint8


def test_batches_are_even_and_never_of_one_image():
    assert Inversion(1000).batches() == [200] * 5
    assert Inversion(401, batch_size=200).batches() == [134, 134, 133]
    assert Inversion(0).batches() == []
    with pytest.raises(GraftkdError, match="at least 2"):
        Inversion(1)


def test_a_teacher_without_batchnorm_is_one_clear_line():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    with pytest.raises(GraftkdError, match="no BatchNorm layer: set synth to 0"):
        invert_batchnorm(net, Normalizer((0.5,) * 3, (0.25,) * 3), _images(), Inversion(4),
                         generator=torch.Generator(), num_classes=5)


def test_synth_is_refused_where_nothing_would_train_on_it():
    from dataclasses import replace

    from graftkd.engine.recipe import Recipe
    from graftkd.refine import DeriveOptions

    with pytest.raises(GraftkdError, match="--refine none"):
        DeriveOptions(refine="none", recipe=replace(Recipe(), synth=100))
    with pytest.raises(GraftkdError, match="synth must be 0 or at least 2"):
        Recipe(synth=-3)


def test_synthetic_images_are_made_once_per_run_and_read_back_on_resume(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import graftkd.engine.inversion as inversion
    from graftkd.engine.recipe import Recipe
    from graftkd.graft import GraftConfig
    from graftkd.refine import synthetic_images

    teacher = SimpleNamespace(model=_net())
    norm = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    recipe, config = Recipe(synth=4, synth_steps=2), GraftConfig(seed=3, precision="fp32")
    images = _images()
    first, record = synthetic_images(teacher, images, norm, config, recipe, torch.device("cpu"), tmp_path, False, 5)
    assert first.shape[0] == 10 and torch.equal(first[:6], images) and record["made"] == 4
    assert (tmp_path / "synthetic.pt").exists() and "reused" not in record

    def refuse(*args, **kwargs):
        raise AssertionError("made again")

    monkeypatch.setattr(inversion, "invert_batchnorm", refuse)
    again, reused = synthetic_images(teacher, images, norm, config, recipe, torch.device("cpu"), tmp_path, False, 5)
    assert torch.equal(again, first) and reused["reused"] == "synthetic.pt"
    none, nothing = synthetic_images(teacher, images, norm, config, Recipe(synth=0), torch.device("cpu"), tmp_path,
                                     False, 5)
    assert none is images and nothing is None
    with pytest.raises(AssertionError, match="made again"):  # other images: the saved ones do not fit
        synthetic_images(teacher, images.flip(0), norm, config, recipe, torch.device("cpu"), tmp_path, False, 5)


def test_synthetic_images_are_kept_across_runs_by_their_whole_key(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import graftkd.engine.inversion as inversion
    import graftkd.refine as refine
    from graftkd.engine.recipe import Recipe
    from graftkd.graft import GraftConfig

    monkeypatch.setattr(refine, "synth_cache_dir", lambda: tmp_path / "cache")
    teacher = SimpleNamespace(model=_net())
    norm = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    recipe, config, cpu = Recipe(synth=4, synth_steps=2), GraftConfig(seed=3, precision="fp32"), torch.device("cpu")
    images = _images()
    made = inversion.invert_batchnorm
    calls = []
    monkeypatch.setattr(inversion, "invert_batchnorm", lambda *a, **k: calls.append(1) or made(*a, **k))

    def run(folder, **changes):
        return refine.synthetic_images(changes.get("teacher", teacher), images, norm,
                                       changes.get("config", config), changes.get("recipe", recipe), cpu,
                                       tmp_path / folder, False, 5)

    first, record = run("a")
    assert len(calls) == 1 and "reused" not in record and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    again, reused = run("b")  # another run, same teacher, images and settings: read, not made
    assert len(calls) == 1 and torch.equal(again, first) and reused["reused"] == "cache"
    assert (tmp_path / "b" / "synthetic.pt").exists()  # the run keeps its own copy for a resume
    _, resumed = run("b")  # ... which says another run made them, so a resumed run's time does not count them
    assert len(calls) == 1 and resumed["reused"] == "synthetic.pt" and resumed["from_cache"] is True
    assert reused["seconds"] == record["seconds"]  # what making them cost, as the first run measured it
    other = SimpleNamespace(model=_net())
    with torch.no_grad():
        next(other.model.parameters()).add_(1e-3)  # another teacher: made again
    run("c", teacher=other)
    run("d", config=GraftConfig(seed=4, precision="fp32"))  # another seed
    run("e", recipe=Recipe(synth=4, synth_steps=3))  # other settings
    assert len(calls) == 4
    run("f", recipe=Recipe(synth=4, synth_steps=2, synth_cache=False))  # the user asked for them to be made
    assert len(calls) == 5 and "synth_cache" not in Recipe(synth=4).to_dict()
    for kept in (tmp_path / "cache").glob("*.pt"):
        kept.write_bytes(b"torn")
    with pytest.warns(UserWarning, match="unreadable synthetic images"):
        run("g")
    assert len(calls) == 6


def test_the_run_summary_says_where_its_synthetic_images_came_from():
    from graftkd.commands.distill import summary_table

    model = {"arch": "net", "params": 100, "flops": 1000}
    payload = {"teacher": {**model, "test_acc": 90.0}, "student": {**model, "test_acc": 80.0},
               "fewshot": {"images": 10, "shots": 1, "manifest": "m.json"}, "wall_seconds": 12.0, "device": "cpu",
               "synth": {"made": 4, "seconds": 700.0}}
    assert "synthesised from them and the teacher's BatchNorm statistics (700 s)" in summary_table(payload)
    payload["synth"]["reused"] = "cache"
    assert "(read from the cache; making them took 700 s)" in summary_table(payload)
    payload["synth"]["reused"] = "synthetic.pt"
    assert "(read from synthetic.pt; making them took 700 s)" in summary_table(payload)
