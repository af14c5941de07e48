"""Teachers: the registry, sha256 refusal, the NetGraft release format, and resumable teacher training."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from graftkd.cli import main
from graftkd.files import safe_torch_load
from graftkd.errors import GraftkdError
from graftkd.models import build_model
from graftkd.models.teacher_registry import (
    ENV_REGISTRY,
    ENV_DIRS,
    load_registered,
    load_registry,
    sha256_of,
)
from graftkd.models.teachers import load_pretrained
from graftkd.loaded import load_teacher

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


# ------------------------------------------------------------------------------------- the registry
def test_packaged_registry_is_consistent_with_its_committed_measurements() -> None:
    registry = load_registry()
    assert len(list(registry)) >= 5
    for entry in registry:
        model = build_model(entry.arch, num_classes=entry.num_classes)
        assert len(entry.mean) == len(entry.std) == model.input_shape[0]
        assert entry.reproduce.startswith("graftkd train-teacher") and f"--arch {entry.arch}" in entry.reproduce
        # the accuracy is a measurement: it must equal the committed result file of `graftkd evaluate`
        record = json.loads((ROOT / entry.accuracy_result).read_text())
        assert record["teacher"] == entry.name and record["sha256"] == entry.sha256
        assert record["accuracy"] == entry.accuracy and record["images"] == 10000
        assert record["command"].startswith("graftkd evaluate --teacher " + entry.name)
        assert abs(entry.accuracy - entry.reference_accuracy) <= 0.1


def _registry_with(tmp_path: Path, monkeypatch, name: str, path: Path, arch: str = "resnet20") -> None:
    registry = {"version": 1, "teachers": [{
        "name": name, "arch": arch, "dataset": "cifar10", "num_classes": 10, "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25], "file": path.name, "sha256": sha256_of(path),
    }]}
    reg_file = tmp_path / "my-registry.json"
    reg_file.write_text(json.dumps(registry))
    monkeypatch.setenv(ENV_REGISTRY, str(reg_file))
    monkeypatch.setenv(ENV_DIRS, str(path.parent))


def test_user_registry_teacher_loads_and_a_tampered_file_is_refused(tmp_path, monkeypatch) -> None:
    src = build_model("resnet20").eval()
    path = tmp_path / "mine.pt"
    torch.save({"state_dict": src.state_dict()}, path)
    _registry_with(tmp_path, monkeypatch, "mine", path)
    model, meta, entry = load_registered("mine")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    assert meta["mean"] == (0.5, 0.5, 0.5) and entry.name == "mine"
    expected = sha256_of(path)

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    found = sha256_of(path)
    with pytest.raises(GraftkdError) as err:
        load_teacher("mine", None, 10)
    assert expected in str(err.value) and found in str(err.value) and "mine" in str(err.value)


class _RunsCode:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_registered_pickle_that_runs_code_is_refused(tmp_path, monkeypatch, capsys) -> None:
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": _RunsCode()}, handle)
    _registry_with(tmp_path, monkeypatch, "evil", path)  # even with a matching sha256, no code runs
    with pytest.raises(GraftkdError, match="refused to load"):
        load_registered("evil")
    assert "code ran" not in capsys.readouterr().out


def test_unknown_teacher_and_missing_file_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_DIRS, str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(GraftkdError, match="did you mean resnet56-cifar10"):
        load_registry().get("resnet56-cifar")
    with pytest.raises(GraftkdError, match="resnet56-4bfd9763.th, not found in .*--teachers-dir"):
        load_registered("resnet56-cifar10")
    with pytest.raises(GraftkdError, match="neither a file nor a registered teacher"):
        load_teacher("no-such-teacher", None, 10)
    weights = tmp_path / "w.pt"
    torch.save(build_model("resnet20").state_dict(), weights)
    with pytest.raises(GraftkdError, match="--teacher-arch"):
        load_teacher(str(weights), None, 10)


def test_registry_file_errors(tmp_path) -> None:
    bad = tmp_path / "r.json"
    bad.write_text('{"version": 1, "teachers": [{"name": "x"}]}')
    with pytest.raises(GraftkdError, match="lacks arch"):
        load_registry(bad)
    bad.write_text("{not json")
    with pytest.raises(GraftkdError, match="not valid JSON"):
        load_registry(bad)


def test_teachers_list_cli_shows_file_status(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(ENV_DIRS, str(tmp_path))
    assert main(["teachers", "list"]) == 0
    out = capsys.readouterr().out
    assert "resnet56-cifar10" in out and "[missing]" in out and str(tmp_path) in out


# ------------------------------------------------------------------------ NetGraft release format
class _ReferenceBlockwiseVGG16(nn.Module):
    """Written from the release's description, independently of graftkd's VGG: blocks of
    conv(bias)[, BN], ReLU closed by a max-pool under ``features.<block>``; classifier Linear-BN1d-Linear."""

    def __init__(self, batch_norm: bool, num_classes: int = 10) -> None:
        super().__init__()
        blocks, cin = [], 3
        for widths in ([64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3):
            layers: list[nn.Module] = []
            for w in widths:
                layers.append(nn.Conv2d(cin, w, 3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(w))
                layers.append(nn.ReLU(inplace=True))
                cin = w
            layers.append(nn.MaxPool2d(2, 2))
            blocks.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_netgraft_release_checkpoint_gives_identical_logits(tmp_path, batch_norm: bool, prefix: str) -> None:
    torch.manual_seed(0)
    reference = _ReferenceBlockwiseVGG16(batch_norm)
    for m in reference.modules():  # non-trivial running statistics, so BN mapping errors would show
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    reference.eval()
    path = tmp_path / "vgg16-blockwise-cifar10.pth"
    torch.save({prefix + k: v for k, v in reference.state_dict().items()}, path)
    arch = "vgg16_bn" if batch_norm else "vgg16"
    model, _ = load_pretrained(arch, path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    other = "vgg16" if batch_norm else "vgg16_bn"
    with pytest.raises(GraftkdError, match=f"use --teacher-arch {arch}"):
        load_pretrained(other, path)


# ---------------------------------------------------------------- train-teacher: kill and resume
TRAIN = ["train-teacher", "--arch", "digits_cnn", "--data", "digits", "--epochs", "3", "--batch-size", "64",
         "--lr", "0.05", "--padding", "1", "--no-flip", "--label-smoothing", "0", "--checkpoint-every-s", "0",
         "--device", "cpu", "--no-progress"]


def _cli(out: Path) -> list[str]:
    return [sys.executable, "-m", "graftkd.cli", *TRAIN, "--out", str(out)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _wait_for_mid_epoch_checkpoint(proc: subprocess.Popen, ckpt: Path, min_epoch: int, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "training finished before it could be interrupted"
        if ckpt.is_file():
            try:
                state = safe_torch_load(ckpt)
            except GraftkdError:  # replaced while we read it: try again
                state = None
            if state and state["epoch"] >= min_epoch and state.get("step", 0) > 0:
                return state
        time.sleep(0.05)
    raise AssertionError("no mid-epoch checkpoint appeared")


@pytest.mark.slow
def test_train_teacher_killed_mid_epoch_resumes_to_identical_weights(tmp_path) -> None:
    straight = tmp_path / "straight"
    subprocess.run(_cli(straight), check=True, env=_env(), capture_output=True, timeout=300)

    resumed = tmp_path / "resumed"
    ckpt = resumed / "checkpoint.pt"
    # 1) SIGINT mid-epoch: the step finishes, a checkpoint is written, the exit message says how to resume
    proc = subprocess.Popen(_cli(resumed), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_mid_epoch_checkpoint(proc, ckpt, min_epoch=0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "re-run the same command to resume" in err
    assert "Traceback" not in err and "error" not in err
    # 2) SIGKILL in the second epoch: no chance to save, the last checkpoint must do
    proc = subprocess.Popen(_cli(resumed), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_mid_epoch_checkpoint(proc, ckpt, min_epoch=1)
    proc.kill()
    proc.wait(timeout=60)
    # 3) the same command again finishes the run
    subprocess.run(_cli(resumed), check=True, env=_env(), capture_output=True, timeout=300)

    a = torch.load(straight / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    result = json.loads((resumed / "result.json").read_text())
    assert result["resumed_at"]["epoch"] >= 1 and result["resumed_at"]["step"] > 0
    assert result["resumed_at"]["seconds_before"] > 0
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    assert all(h["images_per_second"] > 0 for h in result["history"])


def test_train_teacher_refuses_a_checkpoint_from_other_settings(tmp_path) -> None:
    out = tmp_path / "run"
    args = [a if a != "3" else "1" for a in TRAIN] + ["--out", str(out)]
    assert main(args) == 0
    changed = [a if a != "0.05" else "0.1" for a in args]
    (out / "model.pt").unlink()
    code = main(changed)  # the epoch-1 checkpoint was made with lr 0.05
    assert code == 2


# ------------------------------------------------------------------ the real teachers (../shared)
@pytest.mark.shared
@pytest.mark.slow
def test_evaluate_registered_resnet20_reproduces_its_registry_accuracy(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("GRAFTKD_DATA", str(SHARED / "data"))
    out = tmp_path / "eval.json"
    code = main(["evaluate", "--teacher", "resnet20-cifar10", "--teachers-dir", str(SHARED / "teachers"),
                 "--device", "cpu", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads(out.read_text())
    assert abs(record["accuracy"] - load_registry().get("resnet20-cifar10").reference_accuracy) <= 0.1
    assert "matches the registry" in capsys.readouterr().out


def test_readme_teacher_table_matches_the_registry() -> None:
    readme = (ROOT / "README.md").read_text()
    for entry in load_registry():
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{entry.name}` |"))
        assert f"| {entry.accuracy:.2f}% |" in row, row


def test_registeredteacher_accuracy_comes_from_the_record_only_for_the_same_data():
    """A run on exactly the data the registry's accuracy was measured on takes the record; other data, or
    --measure-teacher, measures it."""
    import torch
    from torch import nn

    from graftkd.data.dataset import ImageSet
    from graftkd.loaded import LoadedModel, teacher_accuracy, normalizer

    torch.manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    test = ImageSet(images, torch.arange(20) % 2, ["a", "b"], "toy/test")
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)).eval()
    recorded = {"test_acc": 12.5, "data": {"sha256": test.content_sha256()}, "result": "results/teachers/toy.json"}
    teacher = LoadedModel(model, "toy", (0.5,) * 3, (0.25,) * 3, "toy", None, recorded)
    norm = normalizer(teacher.mean, teacher.std)
    cpu = torch.device("cpu")
    assert teacher_accuracy(teacher, test, norm, cpu, measure=False) == (12.5, "registry (results/teachers/toy.json)")
    measured, how = teacher_accuracy(teacher, test, norm, cpu, measure=True)
    assert how == "measured" and measured != 12.5
    other = ImageSet(images.flip(0).contiguous(), torch.arange(20) % 2, ["a", "b"], "toy/test")
    assert other.content_sha256() != test.content_sha256()
    assert teacher_accuracy(teacher, other, norm, cpu, measure=False)[1] == "measured"
