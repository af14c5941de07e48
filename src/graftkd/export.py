"""``graftkd export``: ship a trained student (or hybrid) as files that run without graftkd's training code.

Three forms, each reloaded and compared with the in-memory model before it is reported (max |logit
difference| <= 1e-4 on a probe batch, else the export fails):

- ``state_dict``: ``model_state_dict.pt`` (plain tensors, loads with ``weights_only=True``) and
  ``model_config.json`` naming the one constructor that rebuilds the model (module, function, kwargs);
- ``torch_export``: ``model.pt2``, a ``torch.export`` program with a dynamic batch dimension, which
  ``torch.export.load`` runs with no graftkd import at all;
- ``onnx``: ``model.onnx`` when the ``onnx`` package is installed (checked with onnxruntime when that is
  installed too); otherwise reported as skipped.

All forms take *normalised* float input (N, C, H, W); the card and the config give the mean/std.
``MODEL_CARD.md`` records teacher, few-shot data, method, accuracy, params, FLOPs, the command that
trained the model and the one that exported it.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftkd.files import atomic_path, atomic_torch_save, atomic_write_json, atomic_write_text
from graftkd.errors import GraftkdError

FORMATS = ("state_dict", "safetensors", "torch_export", "onnx")
TOLERANCE = 1e-4


def _constructor(arch: str, options: dict, num_classes: int, in_channels: int) -> dict:
    """The importable function that rebuilds ``arch`` and its keyword arguments."""
    from graftkd.models.registry import MODEL_REGISTRY

    fn = MODEL_REGISTRY[arch]
    kwargs: dict[str, Any] = {"num_classes": num_classes, **options}
    if in_channels != 3 or arch.startswith("digits"):
        kwargs["in_channels"] = in_channels
    return {"module": fn.__module__, "function": fn.__name__, "kwargs": kwargs}


def rebuild(config: dict) -> nn.Module:
    """What the card tells users to do: import the named function, call it, load the state_dict."""
    factory = getattr(importlib.import_module(config["module"]), config["function"])
    return factory(**config["kwargs"])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def export_model(weights: str | Path, out: str | Path, formats: tuple[str, ...] = FORMATS,
                 result: str | Path | None = None, command: str = "") -> dict:
    """Export ``weights`` (a graftkd student/teacher file) into ``out``; returns what was written and checked."""
    from graftkd.models.convert import read_checkpoint
    from graftkd.models.profile import count_flops, count_params
    from graftkd.loaded import load_model_file

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise GraftkdError(f"unknown export format(s) {', '.join(unknown)}: choose from {', '.join(FORMATS)}")
    weights, out = Path(weights), Path(out)
    _, extras = read_checkpoint(weights)
    arch = extras.get("arch")
    if not arch:
        raise GraftkdError(f"{weights} does not say its architecture: export files written by graftkd "
                           "(student.pt / model.pt), which record it")
    loaded = load_model_file(arch, weights, None)
    model = loaded.model.float().eval()
    input_shape = tuple(getattr(model, "input_shape", (3, 32, 32)))
    probe = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(probe)
    num_classes = int(reference.shape[1])
    options = dict(extras.get("arch_options") or {})
    config = {"format": "graftkd-export/1", "arch": arch, **_constructor(arch, options, num_classes, input_shape[0]),
              "input_shape": list(input_shape), "mean": list(loaded.mean), "std": list(loaded.std),
              "classes": loaded.classes, "input": "normalised float (x / 255 - mean) / std, NCHW"}
    report: dict[str, Any] = {"out": str(out), "formats": {}}

    if "state_dict" in formats:
        atomic_torch_save(out / "model_state_dict.pt", model.state_dict())
        atomic_write_json(out / "model_config.json", config)
        again = rebuild(config)
        again.load_state_dict(torch.load(out / "model_state_dict.pt", weights_only=True))
        with torch.no_grad():
            diff = _max_diff(again.eval()(probe), reference)
        report["formats"]["state_dict"] = _checked("state_dict", diff, ["model_state_dict.pt", "model_config.json"])

    if "safetensors" in formats:
        report["formats"]["safetensors"] = _export_safetensors(model, config, probe, reference, out)

    if "torch_export" in formats:
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(model, (probe,), dynamic_shapes=({0: batch},))
        path = out / "model.pt2"
        with atomic_path(path) as tmp:  # written whole, then renamed into place
            torch.export.save(program, tmp)
        with torch.no_grad():
            diff = _max_diff(torch.export.load(path).module()(probe), reference)
        report["formats"]["torch_export"] = _checked("torch_export", diff, ["model.pt2"])

    if "onnx" in formats:
        report["formats"]["onnx"] = _export_onnx(model, probe, reference, out)

    facts = json.loads(Path(result).read_text()) if result and Path(result).is_file() else {}
    card = _card(config, facts, report, count_params(model), count_flops(model, input_shape), weights, command)
    atomic_write_text(out / "MODEL_CARD.md", card)
    report["card"] = str(out / "MODEL_CARD.md")
    atomic_write_json(out / "export.json", {**report, "config": config, "command": command})
    return report


def _checked(name: str, diff: float, files: list[str]) -> dict:
    if not diff <= TOLERANCE:
        raise GraftkdError(f"{name} export differs from the model by {diff:.3g} (> {TOLERANCE}); not written as valid")
    return {"status": "ok", "max_abs_diff": diff, "files": files}


def _export_onnx(model: nn.Module, probe: torch.Tensor, reference: torch.Tensor, out: Path) -> dict:
    if importlib.util.find_spec("onnx") is None:
        return {"status": "skipped", "reason": "the onnx package is not installed (pip install onnx onnxruntime)"}
    path = out / "model.onnx"
    import warnings

    with warnings.catch_warnings(), atomic_path(path) as tmp:
        # the TorchScript-based exporter needs no onnxscript; it warns it is legacy
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (probe,), str(tmp), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))
    if importlib.util.find_spec("onnxruntime") is None:
        return {"status": "ok (checked with onnx.checker; onnxruntime not installed, logits not compared)",
                "files": ["model.onnx"]}
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(None, {"input": probe.numpy()})[0])
    return _checked("onnx", _max_diff(logits, reference), ["model.onnx"])


def _pct(value: Any) -> str:
    return f"{value:.2f}%" if isinstance(value, (int, float)) else "not measured"


def _export_safetensors(model: nn.Module, config: dict, probe: torch.Tensor, reference: torch.Tensor,
                        out: Path) -> dict:
    """``model.safetensors`` (the state_dict, no pickle) with ``model_config.json`` beside it, reloaded and checked."""
    if importlib.util.find_spec("safetensors") is None:
        return {"status": "skipped", "reason": "the safetensors package is not installed (pip install safetensors)"}
    from safetensors.torch import load_file, save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}  # no shared storage
    path = out / "model.safetensors"
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": config["format"], "arch": config["arch"]})
    atomic_write_json(out / "model_config.json", config)
    again = rebuild(config)
    again.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        diff = _max_diff(again.eval()(probe), reference)
    return _checked("safetensors", diff, ["model.safetensors", "model_config.json"])


def _card(config: dict, facts: dict, report: dict, params: int, flops: int, weights: Path, command: str) -> str:
    teacher = facts.get("teacher") or {}
    student = facts.get("student") or {}
    few = facts.get("fewshot") or {}
    manifest = few.get("manifest") or {}
    kwargs = ", ".join(f"{k}={v!r}" for k, v in config["kwargs"].items())
    lines = [
        f"# Model card: {config['arch']}", "",
        "| | |", "|---|---|",
        f"| architecture | `{config['module']}.{config['function']}({kwargs})` |",
        f"| parameters / FLOPs per image | {params:,} / {flops:,} |",
        f"| input | {config['input_shape']} normalised with mean {config['mean']}, std {config['std']} |",
        f"| test accuracy | {_pct(student.get('test_acc'))} (last-epoch model; the test split is used only to report) |",
        f"| teacher | {teacher.get('arch', '?')} from {teacher.get('source', '?')}, test accuracy {_pct(teacher.get('test_acc'))} |",
        f"| method | {facts.get('method', '?')}, "
        + (f"{few['shots']} unlabeled images per class ({few.get('images', '?')} in all) |" if few.get("shots")
           else f"{few.get('images', '?')} unlabeled images from a folder |"),
        f"| few-shot data | {manifest.get('source', '?')} split {manifest.get('split', '?')}, seed {manifest.get('seed', '?')}, subset {manifest.get('subset', '?')} |",
        f"| trained by | `{facts.get('command', '?')}` at commit {facts.get('commit', '?')} on {facts.get('device', '?')} |",
        f"| weights | {weights} |",
        f"| exported by | `{command}` |", "",
    ]
    if facts.get("warnings"):
        lines += ["## Warnings from training", ""] + [f"- {w}" for w in facts["warnings"]] + [""]
    lines += [
        "## Files and checks", "",
        "| form | files | check (max abs logit difference vs the trained model) |", "|---|---|---|",
    ]
    for name, entry in report["formats"].items():
        check = f"{entry['max_abs_diff']:.2e}" if "max_abs_diff" in entry else entry.get("reason", entry["status"])
        lines.append(f"| {name} | {', '.join(entry.get('files', [])) or '-'} | {entry['status']}: {check} |")
    lines += [
        "", "## Loading", "",
        "```python",
        "import torch",
        "# torch.export form: no graftkd import needed",
        "model = torch.export.load('model.pt2').module()",
        "# state_dict / safetensors form: import only the constructor named above",
        f"from {config['module']} import {config['function']}",
        f"model = {config['function']}({kwargs})",
        "model.load_state_dict(torch.load('model_state_dict.pt', weights_only=True)); model.eval()",
        "# or: from safetensors.torch import load_file; model.load_state_dict(load_file('model.safetensors'))",
        "```", "",
        "A `torch.export` program is already in inference form: its `.module()` raises on `.eval()` / `.train()`, "
        "so call it directly.", "",
    ]
    return "\n".join(lines)
