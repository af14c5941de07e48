"""`graftkd export`: a trained model as state_dict, safetensors, torch.export and ONNX, with a model card."""
from __future__ import annotations

import argparse
from pathlib import Path


NAME = "export"
HELP = "write a trained model as state_dict + config, torch.export and ONNX, with a model card"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, help="a graftkd student.pt / model.pt")
    p.add_argument("--out", required=True, help="folder for the exported files and MODEL_CARD.md")
    p.add_argument("--formats", default="state_dict,safetensors,torch_export,onnx",
                   help="comma-separated subset of: state_dict, safetensors, torch_export, onnx")
    p.add_argument("--result", help="the run's result.json (default: beside --weights) for the model card")


def run(args) -> None:
    from graftkd.engine.runtime import run_facts, resolve_device
    from graftkd.export import export_model

    result = args.result or str(Path(args.weights).with_name("result.json"))
    report = export_model(args.weights, args.out, tuple(f.strip() for f in args.formats.split(",") if f.strip()),
                          result=result, command=run_facts(resolve_device("cpu"))["command"])
    for name, entry in report["formats"].items():
        detail = f"max |diff| {entry['max_abs_diff']:.2e}" if "max_abs_diff" in entry else entry.get("reason", "")
        print(f"{name:<13} {entry['status']}  {detail}")
    print(f"model card: {report['card']}")
