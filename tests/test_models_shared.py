"""The real teacher files in ../shared/teachers load strictly into the zoo and give finite outputs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graftkd.models import build_model, check_block_contract
from graftkd.models.convert import load_state_dict_file
from graftkd.models.teachers import IMAGENET_MEAN, load_pretrained

TEACHERS = Path(__file__).resolve().parents[1].parent / "shared" / "teachers"
VGG_FILE = TEACHERS / "vgg16bn-cifar10-b6de4372.pt"
RESNET_FILES = {
    "resnet20": "resnet20-12fca82f.th",
    "resnet32": "resnet32-d509ac18.th",
    "resnet44": "resnet44-014dd654.th",
    "resnet56": "resnet56-4bfd9763.th",
}

pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(not TEACHERS.is_dir(), reason="../shared/teachers is absent"),
]


def test_vgg16_bn_file_loads_strictly_after_float32_cast() -> None:
    raw = torch.load(VGG_FILE, map_location="cpu", weights_only=True)
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in raw["state_dict"].items()}
    model = build_model("vgg16_bn")
    model.load_state_dict(sd, strict=True)
    assert list(load_state_dict_file(VGG_FILE)) == list(model.state_dict())


def test_vgg16_bn_teacher() -> None:
    model, meta = load_pretrained("vgg16_bn", VGG_FILE)
    assert meta["classes"][0] == "airplane" and abs(meta["mean"][0] - 0.4914) < 1e-3
    x = torch.randn(4, 3, 32, 32)
    check_block_contract(model, x)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("arch", sorted(RESNET_FILES))
def test_akamaster_resnet_teacher(arch: str) -> None:
    path = TEACHERS / RESNET_FILES[arch]
    raw = torch.load(path, map_location="cpu", weights_only=True)
    sd = {k.removeprefix("module."): v for k, v in raw["state_dict"].items()}
    model = build_model(arch)
    own = model.state_dict()
    assert {k for k in own if not k.endswith("num_batches_tracked")} == set(sd)
    model, meta = load_pretrained(arch, path)
    assert meta["mean"] == IMAGENET_MEAN and 91.0 < meta["reported_acc"] < 94.0
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v)
    x = torch.randn(4, 3, 32, 32)
    check_block_contract(model, x)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
