"""Image packs (what a device call carries) and the device script's dry run."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from graftkd.data import load_dataset
from graftkd.data.fewshot import FewShotManifest
from graftkd.data.pack import save_pack
from graftkd.errors import GraftkdError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def test_a_pack_is_a_dataset_spec_with_the_same_pixels_and_a_manifest_can_point_into_it(tmp_path) -> None:
    test = load_dataset("digits", "test")
    train = load_dataset("digits", "train")
    picked = [3, 17, 40, 41]
    path = save_pack(tmp_path / "data.pt", {"test": test, "fewshot": train.subset(picked)},
                     source_indices={"fewshot": picked})
    again = load_dataset(str(path), "test")
    assert again.content_sha256() == test.content_sha256() and again.classes == test.classes
    manifest = FewShotManifest(source="data.pt", split="fewshot", indices=[1, 3], paths=None, seed=0, k=1,
                               subset=0, num_classes=train.num_classes, source_size=4).validate()
    (tmp_path / "m.json").write_text(json.dumps(manifest.to_dict()))
    images = FewShotManifest.load(tmp_path / "m.json").materialize()
    assert torch.equal(images.images, train.images[[17, 41]]) and images.labels is None
    with pytest.raises(GraftkdError, match="has no split 'train'"):
        load_dataset(str(path), "train")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(GraftkdError, match="not an image pack"):
        load_dataset(str(tmp_path / "model.pt"), "test")


def test_a_compressed_pack_reads_back_the_same_pixels_in_fewer_bytes(tmp_path) -> None:
    test = load_dataset("digits", "test")
    plain = save_pack(tmp_path / "plain.pt", {"test": test})
    packed = save_pack(tmp_path / "packed.pt", {"test": test}, compress=True)
    again = load_dataset(str(packed), "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    assert again.content_sha256() == test.content_sha256()
    assert packed.stat().st_size < 0.7 * plain.stat().st_size  # digits: 17 grey levels, mostly flat (0.57)
    edges = torch.tensor([[[[0, 255, 0, 1, 255]]]], dtype=torch.uint8)  # differences that wrap around 256
    from graftkd.data.pack import compress_images, decompress_images

    assert torch.equal(decompress_images(compress_images(edges), list(edges.shape)), edges)


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED / "data" / "cifar10.tar.gz").is_file() or not (SHARED / "teachers").is_dir(),
                    reason="needs ../shared/data and ../shared/teachers")
def test_the_device_script_dry_run_does_one_step_of_every_part(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GRAFTKD_DATA", str(SHARED / "data"))
    monkeypatch.setenv("GRAFTKD_TEACHERS", str(SHARED / "teachers"))
    payload = tmp_path / "payload"
    facts = _module(ROOT / "benchmarks" / "device" / "pack.py", "pack").main(
        ["--shots", "1", "--seeds", "0", "--test-images", "50", "--out", str(payload), "--teachers",
         "resnet56-cifar10,vgg16bn-cifar10", "--bench-grid", str(ROOT / "configs" / "cifar10-vgg16-graft.yaml"),
         "--bench-shots", "5"])
    # the K=1 draw of seed 0 is the first image per class of the K=5 draw of subset 0: stored once
    assert facts["fewshot_images"] == 3 * 50 and (payload / "fewshot" / "k1-s0.json").is_file()
    assert facts["bench_draws"] == [f"cifar10-vgg16-graft/k5-subset{s}" for s in range(3)]
    out = tmp_path / "out"
    report = _module(ROOT / "benchmarks" / "device" / "run.py", "device_run").main(
        ["--dry-run", "--payload", str(payload), "--out", str(out), "--runs", str(tmp_path / "none")])
    parts = report["parts"]
    assert parts["speed"]["outcome"] == {"resnet20": "ok"}  # the dry run does one pair
    assert parts["teacher_speed"]["outcome"] == {"teacher_speed": "ok"}
    grid = parts["vgg16_grid"]["outcome"]
    assert grid["cifar10-vgg16-graft"] == "all done; 1 new cells", grid
    cell = json.loads((out / "results" / "cifar10-vgg16-graft" / "cells" / grid["new_cells"][0]).read_text())
    assert cell["status"] == "ok" and cell["method"] == "pruned_only" and cell["shots"] == 5
    drawn = FewShotManifest.load(out / "results" / "cifar10-vgg16-graft" / "manifests" / "k5-subset0.json")
    from graftkd.data.fewshot import make_manifest

    assert torch.equal(drawn.materialize().images, make_manifest("cifar10", "train", 5, 0, 0).materialize().images)
    (point, outcome), = parts["patient_curve"]["outcome"].items()
    assert outcome.startswith("test "), outcome
    cell = json.loads((out / "results" / "cifar10-patient" / "cells" / f"{point}.json").read_text())
    assert cell["test"]["images"] == 50 and cell["fewshot"]["shots"] == 1 and cell["row"] == "fresh-10m"
    (point, outcome), = parts["fresh_synth"]["outcome"].items()
    assert outcome.startswith("test "), outcome
    cell = json.loads((out / "results" / "cifar10-patient" / "cells" / f"{point}.json").read_text())
    assert cell["row"] == "fresh-10m-synth10000" and cell["synth"]["made"] == 2 and cell["synth"]["steps"] == 1
    (point, outcome), = parts["derived_budget"]["outcome"].items()
    assert outcome.startswith("test "), outcome
    cell = json.loads((out / "results" / "cifar10-derived" / "cells" / f"{point}.json").read_text())
    assert cell["row"] == "default-t16-2m" and cell["init"]["used"] == "derived"
    assert cell["derive"]["loss_options"] == {"temperature": 16} and cell["derive"]["recipe"]["samples"] == 128
    assert json.loads((out / "device-report.json").read_text())["dry_run"] is True
