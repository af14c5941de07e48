"""Exports reload in a fresh process (torch.export: no graftkd at all) and predict what the model predicts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from graftkd.export import export_model
from graftkd.models import build_model
from graftkd.loaded import LoadedModel, save_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

FRESH_EXPORT = """
import sys, torch
program = torch.export.load(sys.argv[1]).module()
x = torch.load(sys.argv[2])
with torch.no_grad():  # in chunks, as a user would run a large split: one 10,000-image batch is far slower
    logits = torch.cat([program(chunk) for chunk in x.split(1000)])
    torch.save({"logits": logits, "graftkd_imported": any(m.startswith("graftkd") for m in sys.modules)}, sys.argv[3])
"""

FRESH_STATE_DICT = """
import importlib, json, sys, torch
config = json.load(open(sys.argv[1] + "/model_config.json"))
model = getattr(importlib.import_module(config["module"]), config["function"])(**config["kwargs"])
model.load_state_dict(torch.load(sys.argv[1] + "/model_state_dict.pt", weights_only=True))
x = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save({"logits": model.eval()(x)}, sys.argv[3])
"""


def _fresh(script: str, args: list[str], tmp_path: Path, with_src: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if with_src:
        env["PYTHONPATH"] = str(ROOT / "src")
    done = subprocess.run([sys.executable, "-c", script, *args, str(tmp_path / "out.pt")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(tmp_path / "out.pt")


def _student(tmp_path: Path, arch: str = "digits_cnn_half", **options) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, **options).eval()
    path = tmp_path / "run" / "student.pt"
    save_model(path, LoadedModel(model, arch, (0.5,), (0.25,), "test", None),
               {"arch_options": options} if options else {})
    return path, model


def test_every_form_reloads_in_a_fresh_process_with_the_same_logits(tmp_path) -> None:
    weights, model = _student(tmp_path)
    report = export_model(weights, tmp_path / "export", command="graftkd export (test)")
    assert report["formats"]["state_dict"]["max_abs_diff"] <= 1e-4
    assert report["formats"]["torch_export"]["max_abs_diff"] <= 1e-4
    assert not [p.name for p in (tmp_path / "export").iterdir() if p.name.startswith(".")]  # no temp files left
    x = torch.randn(7, 1, 8, 8)  # another batch size than the export's probe: the batch dimension is dynamic
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model(x)
    exported = _fresh(FRESH_EXPORT, [str(tmp_path / "export" / "model.pt2"), str(tmp_path / "x.pt")], tmp_path, False)
    assert not exported["graftkd_imported"]
    assert (exported["logits"] - expected).abs().max() <= 1e-4
    rebuilt = _fresh(FRESH_STATE_DICT, [str(tmp_path / "export"), str(tmp_path / "x.pt")], tmp_path, True)
    assert (rebuilt["logits"] - expected).abs().max() <= 1e-4
    card = (tmp_path / "export" / "MODEL_CARD.md").read_text()
    assert "graftkd.models.digits.digits_cnn_half(num_classes=10, in_channels=1)" in card
    assert "graftkd export (test)" in card and "torch.export.load('model.pt2')" in card
    onnx = report["formats"]["onnx"]
    assert onnx["status"] == "ok" or onnx["status"] == "skipped" and "not installed" in onnx["reason"]
    if onnx["status"] == "ok":  # only where onnx + onnxruntime are installed (optional extra "onnx")
        import numpy as np

        np.save(tmp_path / "x.npy", x.numpy())
        script = ("import sys, numpy as np, onnxruntime as ort\n"
                  "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
                  "np.save(sys.argv[3], s.run(None, {'input': np.load(sys.argv[2])})[0])\n"
                  "assert not any(m.startswith(('graftkd', 'torch')) for m in sys.modules)\n")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "export" / "model.onnx"),
                               str(tmp_path / "x.npy"), str(tmp_path / "onnx_out.npy")], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert np.abs(np.load(tmp_path / "onnx_out.npy") - expected.numpy()).max() <= 1e-4


def test_a_hybrid_exports_with_the_options_that_rebuild_it(tmp_path) -> None:
    weights, model = _student(tmp_path, "hybrid", teacher_arch="resnet56", student_arch="resnet20", replace=[2])
    export_model(weights, tmp_path / "export", formats=("state_dict",))
    config = json.loads((tmp_path / "export" / "model_config.json").read_text())
    assert config["function"] == "hybrid" and config["kwargs"]["replace"] == [2]
    x = torch.randn(3, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    rebuilt = _fresh(FRESH_STATE_DICT, [str(tmp_path / "export"), str(tmp_path / "x.pt")], tmp_path, True)
    with torch.no_grad():
        assert (rebuilt["logits"] - model(x)).abs().max() <= 1e-4


@pytest.mark.shared
@pytest.mark.slow
def test_exported_resnet20_predicts_the_cifar10_test_split_like_the_model(tmp_path, monkeypatch) -> None:
    if not (SHARED / "teachers").is_dir() or not (SHARED / "data").is_dir():
        pytest.skip("../shared teachers/data not present")
    monkeypatch.setenv("GRAFTKD_DATA", str(SHARED / "data"))
    from graftkd.data import load_dataset
    from graftkd.loaded import load_teacher, normalizer

    loaded = load_teacher("resnet20-cifar10", None, 10, str(SHARED / "teachers"))
    save_model(tmp_path / "run" / "student.pt", loaded, {})
    export_model(tmp_path / "run" / "student.pt", tmp_path / "export", formats=("torch_export",))
    test = load_dataset("cifar10", "test")
    # the first 2,000 images: the exported program's logits equal the model's there, and that model's accuracy on
    # the whole split is the registry's (tests/test_teachers.py); the whole split here would add a minute of
    # the same evidence
    x, labels = normalizer(loaded.mean, loaded.std)(test.images[:2000]), test.labels[:2000]
    torch.save(x, tmp_path / "x.pt")
    exported = _fresh(FRESH_EXPORT, [str(tmp_path / "export" / "model.pt2"), str(tmp_path / "x.pt")], tmp_path, False)
    assert not exported["graftkd_imported"]
    with torch.no_grad():
        expected = torch.cat([loaded.model.eval()(chunk) for chunk in x.split(1000)])
    torch.testing.assert_close(exported["logits"], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(exported["logits"].argmax(1), expected.argmax(1))
    assert float((exported["logits"].argmax(1) == labels).float().mean()) > 0.88  # the trained weights, not random


def test_quality_warnings_name_what_to_try_and_reach_the_model_card():
    from graftkd.export import _card
    from graftkd.commands.distill import quality_warnings

    good = {"label_free": {"agreement": 91.0}, "init": {"used": "derived"},
            "refine": {"stages": [{"name": "kd", "loss_curve": [(1, 2.0), (2, 1.0)]}]}}
    assert quality_warnings(good) == []
    bad = {"label_free": {"agreement": 12.0}, "init": {"used": "fresh"},
           "graft": {"stages": [{"name": "net 1-3", "loss_curve": [(1, 1.63), (2, 1.85)]}]}}
    warnings = quality_warnings(bad)
    assert len(warnings) == 2 and "derived" in warnings[0] and "lower the learning rate" in warnings[1]
    # high agreement on the near views, low on the far ones (a fresh student that memorised its few images)
    memorised = {"label_free": {"agreement": 93.0, "far": {"agreement": 31.7}}, "init": {"used": "fresh"}}
    (warning,) = quality_warnings(memorised)
    assert "31.7% of far views" in warning and "derived" in warning
    memorised["label_free"]["far"]["agreement"] = 56.5
    assert quality_warnings(memorised) == []
    # a fading student starts as the teacher: its loss is judged from the end of the fading (chunk 2 of 4) on
    fading = {"label_free": {"agreement": 95.0}, "init": {"used": "derived"}, "fade": {"share": 0.5, "steps": 100},
              "refine": {"stages": [{"name": "kd", "epochs": 4, "steps": 200,
                                     "loss_curve": [(1, 0.5), (2, 3.0), (3, 1.5), (4, 1.0)]}]}}
    assert quality_warnings(fading) == []
    fading["refine"]["stages"][0]["loss_curve"][-1] = (4, 3.5)
    assert "ended above where the fading ended (3 -> 3.5)" in quality_warnings(fading)[0]
    config = {"arch": "digits_cnn_half", "module": "graftkd.models", "function": "digits_cnn_half", "kwargs": {},
              "input_shape": [1, 8, 8], "mean": [0.0], "std": [1.0]}
    card = _card(config, {"warnings": warnings}, {"formats": {}}, 10, 20, "student.pt", "graftkd export")
    assert "## Warnings from training" in card and warnings[1] in card and "raises on `.eval()`" in card


def test_safetensors_export_reloads_and_serves_as_a_teacher(tmp_path) -> None:
    pytest.importorskip("safetensors")
    from graftkd.loaded import load_teacher, saved_arch

    weights, model = _student(tmp_path)
    report = export_model(weights, tmp_path / "export", formats=("safetensors",))
    assert report["formats"]["safetensors"]["status"] == "ok"
    path = tmp_path / "export" / "model.safetensors"
    assert saved_arch(path) == "digits_cnn_half"
    teacher = load_teacher(str(path), None, None)  # the architecture comes from the file's metadata
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(teacher.model.eval()(x), model(x), atol=1e-5)
    assert teacher.mean == (0.5,) and teacher.std == (0.25,)
