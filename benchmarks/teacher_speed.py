"""Teacher-training throughput (images/s) per model, precision and memory format, on synthetic data.

Why: `graftkd train-teacher` picks bf16 autocast and channels_last by default where they pay off; this
measures that choice on the machine at hand instead of trusting a number from elsewhere.

    python benchmarks/teacher_speed.py --models vgg16_bn resnet20 --steps 6 --out benchmarks/results/teacher_speed-cpu.json

Each configuration runs ``--warmup`` untimed steps, then ``--steps`` timed SGD steps (forward, loss,
backward, optimiser) at ``--batch-size`` on random 32x32 images. Only throughput is measured here.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from graftkd.files import atomic_write_json  # noqa: E402
from graftkd.engine.runtime import autocast, resolve_device, run_facts, synchronize  # noqa: E402
from graftkd.models import build_model  # noqa: E402


def time_config(arch: str, precision: str, channels_last: bool, device: torch.device, batch: int,
                warmup: int, steps: int) -> float:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(arch).to(device=device, memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with autocast(device, precision):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16_bn", "resnet20", "resnet56"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="benchmarks/results/teacher_speed.json")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    facts = run_facts(device, seed=0)
    started = time.perf_counter()
    rows = []
    for arch in args.models:
        for precision in ("fp32", "bf16"):
            for channels_last in (False, True):
                ips = time_config(arch, precision, channels_last, device, args.batch_size, args.warmup, args.steps)
                rows.append({"model": arch, "precision": precision, "channels_last": channels_last,
                             "images_per_second": round(ips, 1)})
                print(f"{arch:<10} {precision:<5} channels_last={channels_last!s:<5} {ips:8.1f} img/s", flush=True)
    for arch in args.models:
        base = next(r for r in rows if r["model"] == arch and r["precision"] == "fp32" and not r["channels_last"])
        for r in rows:
            if r["model"] == arch:
                r["speedup_vs_fp32_contiguous"] = round(r["images_per_second"] / base["images_per_second"], 2)
    payload = {**facts, "benchmark": "teacher_speed", "batch_size": args.batch_size, "steps": args.steps,
               "warmup": args.warmup, "rows": rows, "wall_seconds": round(time.perf_counter() - started, 1)}
    atomic_write_json(Path(args.out), payload)
    print(json.dumps({r["model"] + "/" + r["precision"] + ("/cl" if r["channels_last"] else ""):
                      r["speedup_vs_fp32_contiguous"] for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
