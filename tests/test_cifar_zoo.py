"""The CIFAR-100 benchmark zoo (RepDistiller / CRD names): stages, blocks, shapes, sizes, fx tracing."""
from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn

from graftkd.models import build_model, check_block_contract, count_params, list_models
from graftkd.models.base import check_stage_contract
from graftkd.models.resnet_cifar import ResNetCifarA
from graftkd.models.resnet_repdistiller import ResNetRD
from graftkd.models.shufflenet import ChannelShuffle

NUM_CLASSES = 100

#: features f_0 .. f_{n-1} (C, H, W) or (D,) on a 32x32 input; the classifier stage follows.
FEATURES: dict[str, list[tuple[int, ...]]] = {
    **{name: [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]
       for name in ("resnet8", "resnet14", "resnet20_b", "resnet32_b", "resnet56_b", "resnet110_b",
                    "resnet20", "resnet56")},
    "resnet8x4": [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)],
    "resnet32x4": [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)],
    "wrn_16_2": [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,)],
    "wrn_40_1": [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)],
    "wrn_16_1": [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)],
    "wrn_40_2": [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,)],
    "vgg8": [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4), (512,)],
    "vgg13": [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4), (512,)],
    "mobilenetv2": [(32, 16, 16), (24, 16, 16), (32, 8, 8), (96, 4, 4), (320, 2, 2), (1280,)],
    "mobilenetv2_half": [(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2), (1280,)],
    "shufflev1": [(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4), (960,)],
    "shufflev2": [(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4), (1024, 4, 4), (1024,)],
    "resnet50_cifar": [(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4), (2048,)],
    "resnet18_cifar": [(64, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512,)],
}
NEW = [n for n in FEATURES if n not in ("resnet20", "resnet56", "resnet18_cifar")]
N_BLOCKS = {n: 4 for n in ("vgg8", "vgg13", "mobilenetv2", "mobilenetv2_half", "resnet50_cifar", "resnet18_cifar")}

#: exact parameter counts at 100 classes of these implementations (regression guard; each one checked
#: against the published sizes below where those exist, and by hand for vgg8 and resnet50_cifar).
EXACT_PARAMS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20_b": 278_324, "resnet32_b": 472_756,
    "resnet56_b": 861_620, "resnet110_b": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156, "wrn_16_1": 180_916,
    "vgg8": 3_965_028, "vgg13": 9_462_180,
    "mobilenetv2": 2_353_060, "mobilenetv2_half": 812_836,
    "shufflev1": 949_258, "shufflev2": 1_355_528,
    "resnet50_cifar": 23_705_252,
    "resnet20": 275_572, "resnet56": 858_868,  # option A: the 10-class counts of test_models + 64*90+90
}

#: published sizes (millions at 100 classes) of the RepDistiller / CRD models, as commonly quoted in
#: the CIFAR-100 distillation literature and listed in this zoo's task brief; wrn_40_1 (0.57M) and
#: resnet110 (1.7M, written 1.73 here) are quoted from memory of the same tables. resnet50_cifar is
#: derived: torchvision ResNet-50 (25,557,032 at 1000 classes) minus 900 fc rows (1,844,100) and with a
#: 3x3 instead of a 7x7 stem conv (-7,680) = 23,705,252.
LITERATURE_M = {
    "resnet20_b": 0.28, "resnet56_b": 0.86, "resnet110_b": 1.73,
    "resnet8x4": 1.23, "resnet32x4": 7.43,
    "wrn_16_2": 0.70, "wrn_40_1": 0.57, "wrn_40_2": 2.26,
    "vgg8": 3.96, "vgg13": 9.46,
    "mobilenetv2_half": 0.81,
    "shufflev1": 0.95, "shufflev2": 1.36,
    "resnet50_cifar": 23.71,
}


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes=NUM_CLASSES).eval()


def test_every_name_is_registered() -> None:
    assert set(FEATURES) <= set(list_models())
    # the option-A names still build the akamaster nets that load the shared teachers
    for name in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110"):
        assert type(build_model(name)) is ResNetCifarA
    for name in ("resnet8", "resnet14", "resnet20_b", "resnet32_b", "resnet56_b", "resnet110_b", "resnet8x4",
                 "resnet32x4"):
        assert type(build_model(name)) is ResNetRD


@pytest.mark.parametrize("name", list(FEATURES))
def test_stages_and_blocks(name: str) -> None:
    model = _build(name)
    x = _x()
    keys_before = list(model.state_dict())

    shapes = check_stage_contract(model, x)
    assert [tuple(s) for s in shapes] == [(2, *f) for f in FEATURES[name]]
    check_block_contract(model, x)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, NUM_CLASSES)

    stage_parts, block_parts = model.stage_parts(), model.block_parts()
    assert len(model.blocks()) == len(model.block_names()) == N_BLOCKS.get(name, 3)
    assert len(set(model.stage_names())) == len(model.stage_names()) == len(stage_parts)
    assert len(set(model.feature_paths())) == len(stage_parts) - 1
    assert any(isinstance(m, nn.Linear) for m in model.stages()[-1].modules())  # the classifier stage
    # both cuts are the same sequence of module calls, and every block end is a stage end
    assert [id(p) for s in stage_parts for p in s] == [id(p) for b in block_parts for p in b]
    stage_ends = [sum(len(s) for s in stage_parts[: i + 1]) for i in range(len(stage_parts))]
    block_ends = [sum(len(b) for b in block_parts[: i + 1]) for i in range(len(block_parts))]
    assert set(block_ends) <= set(stage_ends)
    with torch.no_grad():
        y, stage_out = x, []
        for stage in model.stages():
            y = stage(y)
            stage_out.append(y)
        y, block_out = x, []
        for block in model.blocks():
            y = block(y)
            block_out.append(y)
    for end, out in zip(block_ends, block_out):
        assert torch.equal(out, stage_out[stage_ends.index(end)])
    assert torch.equal(block_out[-1], logits)

    # views only: no new state_dict keys, and the stages cover every parameter
    assert list(model.state_dict()) == keys_before
    assert {id(p) for s in model.stages() for p in s.parameters()} == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("name", list(FEATURES))
def test_fx_trace(name: str) -> None:
    model = _build(name)
    x = _x()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))
    for stage in model.stages():  # every stage view traces as well
        torch.fx.symbolic_trace(stage)


@pytest.mark.parametrize("name", list(EXACT_PARAMS))
def test_param_counts(name: str) -> None:
    n = count_params(build_model(name, num_classes=NUM_CLASSES))
    assert n == EXACT_PARAMS[name]
    if name in LITERATURE_M:
        assert abs(n / 1e6 - LITERATURE_M[name]) <= 0.01 * LITERATURE_M[name]


def test_reference_key_layouts() -> None:
    keys = set(build_model("resnet8x4").state_dict())  # layer1 changes width 32 -> 64: projection
    assert {"layer1.0.downsample.0.weight", "layer3.0.downsample.1.running_var", "fc.weight"} <= keys
    keys = set(build_model("resnet20_b").state_dict())
    assert "layer1.0.downsample.0.weight" not in keys and "layer2.0.downsample.0.weight" in keys

    keys = set(build_model("wrn_40_1").state_dict())
    assert "block1.layer.0.convShortcut.weight" not in keys  # 16 -> 16: identity shortcut
    assert {"block2.layer.0.convShortcut.weight", "block3.layer.5.conv2.weight", "bn1.weight", "fc.bias"} <= keys

    keys = set(build_model("vgg13").state_dict())
    assert {"block0.0.bias", "block0.1.running_mean", "block0.3.weight", "block4.4.bias", "classifier.weight"} <= keys
    assert not any(k.startswith("block0.5") for k in keys)  # the block's closing ReLU is the model's relu0

    keys = set(build_model("mobilenetv2_half").state_dict())
    assert {"conv1.0.weight", "layers.0.0.conv.0.weight", "layers.6.0.conv.7.running_var", "conv2.1.bias",
            "classifier.0.weight"} <= keys

    keys = set(build_model("resnet50_cifar").state_dict())
    assert {"layer1.0.downsample.0.weight", "layer4.2.conv3.weight", "layer4.2.bn3.bias", "fc.weight"} <= keys
    assert build_model("resnet50_cifar").conv1.kernel_size == (3, 3)


def test_architecture_details() -> None:
    wrn = _build("wrn_40_2")
    assert wrn.feature_paths()[3] == "block3"  # f3 before the final BN-ReLU
    assert wrn.stage_parts()[4][:2] == [wrn.bn1, wrn.relu]

    vgg = _build("vgg8")
    assert not hasattr(vgg, "pool3")  # 32x32 inputs: block3 and block4 both at 4x4, as the reference
    with torch.no_grad():
        assert (vgg.stages()[0](_x()) >= 0).all()  # f0 is taken after its ReLU

    mnv2 = _build("mobilenetv2")
    flags = [[blk.use_res_connect for blk in group] for group in mnv2.layers]
    assert flags == [[False], [False, True], [False, True, True], [False, True, True, True], [False, True, True],
                     [False, True, True], [False]]
    assert mnv2.layers[0][0].conv[0].out_channels == 32  # expansion conv kept at t = 1 (as the reference)

    v1 = _build("shufflev1")
    assert v1.layer1[0].conv1.groups == 1 and v1.layer1[1].conv1.groups == 3 and v1.layer2[0].conv1.groups == 3
    assert v1.layer1[0].conv3.out_channels == 240 - 24  # stride 2: concat with the pooled input

    v2 = _build("shufflev2")
    assert v2.feature_paths()[4] == "relu2" and v2.conv2.out_channels == 1024


def test_channel_shuffle_matches_view_permute() -> None:
    x = torch.randn(2, 12, 3, 3)
    ref = x.view(2, 3, 4, 3, 3).permute(0, 2, 1, 3, 4).reshape(2, 12, 3, 3)
    assert torch.equal(ChannelShuffle(3)(x), ref)


def test_option_a_blocks_unchanged() -> None:
    model = build_model("resnet20")
    assert model.block_names() == ["stem+layer1", "layer2", "layer3+head"]
    assert [len(b) for b in model.block_parts()] == [4, 1, 4]
    assert model.feature_paths() == ["relu", "layer1", "layer2", "layer3", "flatten"]
    keys = list(model.state_dict())
    assert keys[0] == "conv1.weight" and keys[-2:] == ["linear.weight", "linear.bias"]
