"""Model zoo: the block contract, exact parameter counts, key layouts, profiling and checkpoint loading."""
from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn
import pytest

from graftkd.errors import GraftkdError
from graftkd.models import build_model, check_block_contract, count_flops, count_params, format_count, list_models
from graftkd.models.convert import (
    detect_vgg_batch_norm,
    from_netgraft_release,
    load_into,
    load_state_dict_file,
    strip_prefix,
)
from graftkd.models.resnet_cifar import ShortcutA
from graftkd.models.teachers import CIFAR10_MEAN, IMAGENET_MEAN, load_pretrained

ALL = [
    "vgg16", "vgg16_bn", "vgg16_graft", "vgg16_graft_bn", "vgg16_half", "vgg16_half_bn",
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18_cifar",
    "resnet18", "resnet34", "digits_cnn", "digits_cnn_half",
]
N_BLOCKS = {"resnet18_cifar": 4, "resnet18": 4, "resnet34": 4, "digits_cnn": 4, "digits_cnn_half": 4}
N_BLOCKS.update({n: 6 for n in ALL if n.startswith("vgg")})
N_BLOCKS.update({n: 3 for n in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")})


def _input(model: nn.Module, name: str, n: int = 2) -> torch.Tensor:
    shape = (3, 64, 64) if name in ("resnet18", "resnet34") else model.input_shape  # 64x64 keeps ImageNet nets fast
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))


# the CIFAR-100 benchmark's zoo, tested in tests/test_cifar_zoo.py
CIFAR_ZOO = ["resnet8", "resnet14", "resnet20_b", "resnet32_b", "resnet56_b", "resnet110_b", "resnet8x4", "resnet32x4",
             "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg13", "mobilenetv2", "mobilenetv2_half", "shufflev1",
             "shufflev2", "resnet50_cifar"]


def test_registry_lists_every_model() -> None:
    assert sorted(ALL + CIFAR_ZOO + ["hybrid"]) == list_models()  # hybrid: partial grafting (test_partial.py)


@pytest.mark.parametrize("name", ALL)
def test_block_contract(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7)
    x = _input(model, name)
    keys_before = list(model.state_dict())
    blocks, names = model.blocks(), model.block_names()
    assert len(blocks) == len(names) == N_BLOCKS[name]
    assert len(set(names)) == len(names)

    check_block_contract(model, x)  # bitwise, eval mode
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 7)
        y = x
        for block in blocks:
            traced = torch.fx.symbolic_trace(block)
            y_next = block(y)
            assert torch.equal(traced(y), y_next)
            y = y_next
        assert torch.equal(out, y)
    torch.fx.symbolic_trace(model)  # the whole model traces too

    # views share the model's parameters and add no state_dict keys
    assert list(model.state_dict()) == keys_before
    block_params = {id(p) for b in blocks for p in b.parameters()}
    assert block_params == {id(p) for p in model.parameters()}
    assert model.training is False and all(not m.training for m in model.modules())


def test_block_contract_in_train_mode() -> None:
    model = build_model("resnet20").train()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        y = x
        for block in model.blocks():
            y = block(y)
    assert torch.equal(out, y)  # batch statistics: the output does not depend on running stats


@pytest.mark.parametrize(
    "name,num_classes,expected",
    [
        ("vgg16", 10, 14_983_498),
        ("vgg16_bn", 10, 14_991_946),
        ("vgg16_graft", 10, 5_413_706),  # the paper's 5.41M student
        ("vgg16_graft_bn", 10, 5_419_082),
        ("vgg16_half", 10, 3_817_898),
        ("resnet20", 10, 269_722),
        ("resnet32", 10, 464_154),
        ("resnet44", 10, 658_586),
        ("resnet56", 10, 853_018),
        ("resnet110", 10, 1_727_962),
        ("resnet18_cifar", 10, 11_173_962),
        ("resnet18", 1000, 11_689_512),  # torchvision's numbers
        ("resnet34", 1000, 21_797_672),
        ("digits_cnn", 10, 94_186),
        ("digits_cnn_half", 10, 24_058),
    ],
)
def test_param_counts(name: str, num_classes: int, expected: int) -> None:
    assert count_params(build_model(name, num_classes=num_classes)) == expected


def test_resnet_imagenet_default_classes_and_keys() -> None:
    from graftkd.models.resnet_imagenet import resnet18

    model = resnet18()
    assert model.fc.out_features == 1000
    keys = set(model.state_dict())
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.1.bn2.bias",
                "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean",
                "layer4.1.conv2.weight", "fc.weight", "fc.bias"):
        assert key in keys
    assert not any(k.startswith("layer1.0.downsample") for k in keys)
    assert len(keys) == 122  # torchvision resnet18's state_dict size
    assert not any(isinstance(m, nn.Conv2d) and m.bias is not None for m in model.modules())


def test_vgg_key_layout() -> None:
    keys = set(build_model("vgg16_bn").state_dict())
    for key in ("features.0.0.weight", "features.0.0.bias", "features.0.1.running_mean", "features.0.3.weight",
                "features.2.6.weight", "features.4.7.num_batches_tracked", "classifier.0.weight",
                "classifier.1.running_var", "classifier.2.bias"):
        assert key in keys
    plain = build_model("vgg16")
    assert "features.0.2.weight" in plain.state_dict()  # conv i, ReLU i+1, next conv at i+2
    assert isinstance(plain.features[0][-1], nn.MaxPool2d)
    assert not any(isinstance(m, nn.ReLU) for m in plain.classifier)
    graft = build_model("vgg16_graft")
    assert graft.classifier[0].in_features == 256 and graft.classifier[0].out_features == 512


def test_resnet_cifar_keys_and_shortcut() -> None:
    keys = list(build_model("resnet20").state_dict())
    assert keys[0] == "conv1.weight" and keys[-2:] == ["linear.weight", "linear.bias"]
    assert not any("shortcut" in k or "downsample" in k for k in keys)
    x = torch.randn(2, 16, 32, 32)
    y = ShortcutA(8)(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


def test_digits_width_and_batch_norm_options() -> None:
    half = build_model("digits_cnn_half")
    full = build_model("digits_cnn", batch_norm=False)
    assert half.features[0][0].out_channels == 16 and full.features[0][0].out_channels == 32
    assert not any(isinstance(m, nn.BatchNorm2d) for m in full.modules())
    assert full.features[0][0].bias is not None
    x = torch.randn(3, 1, 8, 8)
    shapes = []
    for model in (half, build_model("digits_cnn")):
        y, s = x, []
        for block in model.eval().blocks()[:-1]:
            y = block(y)
            s.append(tuple(y.shape[2:]))
        shapes.append(s)
    assert shapes[0] == shapes[1] == [(8, 8), (4, 4), (2, 2)]


def test_build_model_errors() -> None:
    with pytest.raises(GraftkdError, match="vgg16_graft"):
        build_model("vgg16_graf")
    with pytest.raises(GraftkdError, match="does not accept"):
        build_model("resnet20", width=2)
    with pytest.raises(GraftkdError, match="num_classes"):
        build_model("resnet20", num_classes=0)
    assert build_model("  ResNet20 ").linear.out_features == 10


def test_count_flops() -> None:
    vgg = build_model("vgg16").train()
    flops = count_flops(vgg, (3, 32, 32))
    assert isinstance(flops, int)
    assert 0.55e9 < flops < 0.70e9  # ~0.31 GMACs, FlopCounterMode counts a MAC as 2 FLOPs
    assert vgg.training  # mode restored
    assert 75e6 < count_flops(build_model("resnet20"), (3, 32, 32)) < 90e6  # ~41M MACs
    assert count_flops(build_model("digits_cnn"), (1, 8, 8)) > 0


def test_format_count() -> None:
    assert format_count(5_413_706) == "5.41M"
    assert format_count(313_000_000) == "0.31G"
    assert format_count(269_722) == "0.27M"
    assert format_count(14_983_498) == "14.98M"
    assert format_count(50_000) == "50.00K"
    assert format_count(42) == "42"
    assert format_count(626_927_616, unit="M") == "626.93M"


# ------------------------------------------------------------------------------------ convert


def test_strip_prefix() -> None:
    sd = {"module.a": torch.zeros(1), "b": torch.ones(1)}
    assert list(strip_prefix(sd)) == ["a", "b"]


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_load_state_dict_file_formats_and_half_cast(tmp_path, wrap: str | None) -> None:
    sd = build_model("digits_cnn_half").state_dict()
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    obj = half if wrap is None else {wrap: half, "mean": [0.5]}
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    loaded = load_state_dict_file(path)
    assert list(loaded) == list(sd)
    assert all(v.dtype == sd[k].dtype for k, v in loaded.items())  # float32 again, int64 counters untouched


def test_load_state_dict_file_without_state_dict(tmp_path) -> None:
    path = tmp_path / "bad.pt"
    torch.save({"epoch": 3, "note": "x"}, path)
    with pytest.raises(GraftkdError, match="no state_dict"):
        load_state_dict_file(path)


def test_load_into_wrong_architecture() -> None:
    with pytest.raises(GraftkdError) as info:
        load_into(build_model("resnet20"), build_model("vgg16_half").state_dict(), source="teacher.pt")
    msg = str(info.value)
    assert "\n" not in msg
    assert "teacher.pt" in msg and "missing" in msg and "unexpected" in msg
    assert "conv1.weight" in msg and "features.0.0.weight" in msg and "--teacher-arch" in msg


def test_load_into_shape_mismatch_and_missing_counters() -> None:
    with pytest.raises(GraftkdError, match="wrong shape"):
        load_into(build_model("resnet20", num_classes=100), build_model("resnet20").state_dict(), source="f")
    src = build_model("resnet20")
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}  # akamaster files
    dst = load_into(build_model("resnet20"), sd, source="f")
    assert all(torch.equal(a, b) for a, b in zip(dst.parameters(), src.parameters()))


def test_vgg_release_mapping() -> None:
    bn_sd = build_model("vgg16_bn").state_dict()
    assert detect_vgg_batch_norm(bn_sd) is True
    assert detect_vgg_batch_norm(build_model("vgg16").state_dict()) is False
    with pytest.raises(GraftkdError):
        detect_vgg_batch_norm(build_model("resnet20").state_dict())
    prefixed = {f"module.{k}": v for k, v in bn_sd.items()}
    assert list(from_netgraft_release(prefixed)) == list(bn_sd)

    # a flat torchvision-style VGG (pools inline) is re-indexed block by block
    for name, bn in (("vgg16", False), ("vgg16_bn", True)):
        model = build_model(name)
        flat, i = {}, 0
        for block in model.features:
            for j, layer in enumerate(block):
                for pname, t in layer.state_dict().items():
                    flat[f"features.{i + j}.{pname}"] = t
            i += len(block)
        flat.update({f"classifier.{k}": v for k, v in model.classifier.state_dict().items()})
        mapped = from_netgraft_release(flat, batch_norm=None)
        assert set(mapped) == set(model.state_dict())
        assert all(torch.equal(mapped[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------ teachers


def test_load_pretrained_akamaster_format(tmp_path) -> None:
    src = build_model("resnet20").eval()
    sd = {f"module.{k}": v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet20.th"
    torch.save({"best_prec1": 91.0, "state_dict": sd}, path)
    model, meta = load_pretrained("resnet20", path)
    assert not model.training
    assert meta["mean"] == IMAGENET_MEAN and meta["reported_acc"] == 91.0 and "classes" not in meta
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_load_pretrained_vgg_half_file(tmp_path) -> None:
    src = build_model("vgg16_half_bn")
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in src.state_dict().items()}
    path = tmp_path / "vgg.pt"
    torch.save({"state_dict": half, "mean": [0.1, 0.2, 0.3], "std": [1.0, 1.0, 1.0], "classes": list("abcdefghij")}, path)
    model, meta = load_pretrained("vgg16_half_bn", path)
    assert meta["mean"] == (0.1, 0.2, 0.3) and meta["classes"][0] == "a"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(GraftkdError, match="vgg16_half_bn"):
        load_pretrained("vgg16_half", path)  # BN file, BN-free arch: the hint names the right one
    _, meta_default = load_pretrained("vgg16_half_bn", _save_raw(tmp_path, src))
    assert meta_default["mean"] == CIFAR10_MEAN


def _save_raw(tmp_path, model: nn.Module):
    path = tmp_path / "raw.pt"
    torch.save(model.state_dict(), path)
    return path


def test_a_weights_file_says_its_class_count_when_nobody_else_does(tmp_path) -> None:
    from graftkd.models.teachers import load_pretrained

    torch.save(build_model("digits_cnn", num_classes=7).state_dict(), tmp_path / "seven.pt")
    model, _ = load_pretrained("digits_cnn", tmp_path / "seven.pt", num_classes=None)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 7)
    with pytest.raises(GraftkdError, match="predicts 7 classes but the data has 10"):
        load_pretrained("digits_cnn", tmp_path / "seven.pt", num_classes=10)
    with pytest.raises(GraftkdError, match="wrong shape"):  # a different width is not a class count
        torch.save(build_model("digits_cnn_half", num_classes=10).state_dict(), tmp_path / "half.pt")
        load_pretrained("digits_cnn", tmp_path / "half.pt", num_classes=None)
