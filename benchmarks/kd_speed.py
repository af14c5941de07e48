"""Few-shot KD step throughput (images/s) per precision and memory format: teacher forward under no_grad,
student forward/backward, SGD step, as the shared loop runs it (``graftkd.engine.loop``).

    python benchmarks/kd_speed.py --teacher resnet56 --student resnet20 --out benchmarks/results/kd_speed-cpu.json

All settings are timed in one process, interleaved round by round (so drift on the machine hits every
setting alike); the ratios against fp32 contiguous are what to read. Random weights and images: only
speed is measured here.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from graftkd.distill.losses import kd_loss  # noqa: E402
from graftkd.files import atomic_write_json  # noqa: E402
from graftkd.engine.runtime import autocast, run_facts  # noqa: E402
from graftkd.models import build_model  # noqa: E402

SETTINGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per setting and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile (inductor) of teacher and student in the fastest eager setting, "
                             "compile time counted separately")
    parser.add_argument("--out")
    args = parser.parse_args()
    began = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    torch.manual_seed(0)
    teacher, student = build_model(args.teacher).eval(), build_model(args.student).train()
    x = torch.randn(args.batch_size, 3, 32, 32)
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-4, momentum=0.9, nesterov=True)

    def step(precision: str, channels_last: bool) -> None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        teacher.to(memory_format=fmt)
        student.to(memory_format=fmt)
        xx = x.contiguous(memory_format=fmt)
        with torch.no_grad(), autocast(device, precision):
            t = teacher(xx).float()
        with autocast(device, precision):
            s = student(xx)
        loss = kd_loss(s.float(), t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = {s: 0.0 for s in SETTINGS}
    for setting in SETTINGS:  # warm-up: first calls pick kernels
        for _ in range(2):
            step(*setting)
    for _ in range(args.rounds):
        for setting in SETTINGS:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(*setting)
            seconds[setting] += time.perf_counter() - start
    images = args.rounds * args.steps * args.batch_size
    base = images / seconds[SETTINGS[0]]
    rows = []
    for (precision, cl) in SETTINGS:
        ips = images / seconds[(precision, cl)]
        rows.append({"precision": precision, "channels_last": cl, "images_per_second": ips, "ratio": ips / base})
        print(f"{precision} {'channels_last' if cl else 'contiguous':13s} {ips:7.1f} img/s  x{ips / base:.2f}")
    compiled = None
    if args.compile:
        fastest = max(rows, key=lambda r: r["images_per_second"])
        precision, cl = fastest["precision"], fastest["channels_last"]
        eager_t, eager_s = teacher, student
        teacher, student = torch.compile(eager_t), torch.compile(eager_s)
        start = time.perf_counter()
        for _ in range(2):
            step(precision, cl)  # the first calls compile (forward, backward)
        compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(args.rounds * args.steps):
            step(precision, cl)
        ips = images / (time.perf_counter() - start)
        eager = next(r["images_per_second"] for r in rows if (r["precision"], r["channels_last"]) == (precision, cl))
        steps_to_win = compile_seconds / max(1e-9, args.batch_size / eager - args.batch_size / ips) if ips > eager else None
        compiled = {"precision": precision, "channels_last": cl, "compile_seconds": compile_seconds,
                    "images_per_second": ips, "ratio_vs_eager": ips / eager, "steps_to_pay_back": steps_to_win}
        print(f"torch.compile {precision} {'channels_last' if cl else 'contiguous'}: {ips:.1f} img/s (x{ips / eager:.2f} vs eager), compile "
              f"{compile_seconds:.0f} s, pays back after {steps_to_win and round(steps_to_win)} steps")
    if args.out:
        atomic_write_json(args.out, {"command": " ".join(["python"] + sys.argv), **run_facts(device, 0),
                                     "teacher": args.teacher, "student": args.student, "batch_size": args.batch_size,
                                     "steps_per_setting": args.rounds * args.steps, "rows": rows, "compiled": compiled,
                                     "wall_seconds": time.perf_counter() - began})


if __name__ == "__main__":
    main()
