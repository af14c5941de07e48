"""Speed of the greedy depth rule (``graftkd.derive.depth``): trials that replay the units before the tried one
from a recorded pass, against trials that run the whole network, in one run on one machine.

Both must choose the same units (the replayed values are the ones a full pass computes); the script checks it.

    python benchmarks/greedy_speed.py --out benchmarks/results/greedy_speed-cpu.json

ResNet-56 -> ResNet-20 on random weights with BatchNorm statistics re-estimated on the inputs (so the units
differ), on ``--images`` random images (100: K=10 on CIFAR-10). Runs from a fresh clone.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import graftkd.derive.depth as depth  # noqa: E402
from graftkd.engine.bn import reestimate_batchnorm  # noqa: E402
from graftkd.engine.runtime import device_description, git_commit  # noqa: E402
from graftkd.files import atomic_write_json  # noqa: E402
from graftkd.models import build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    teacher = build_model(args.teacher)
    x = torch.randn(args.images, 3, 32, 32)
    with torch.no_grad():
        for m in teacher.modules():  # scaled residual branches: each unit changes the logits by its own amount
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.0)
        reestimate_batchnorm(teacher, [x])
    teacher.eval()
    error = depth.logit_error_fn(teacher, x)
    rows, chosen = {}, {}
    for name, limit in (("replayed", depth.REPLAY_BYTES), ("full", -1)):
        saved, depth.REPLAY_BYTES = depth.REPLAY_BYTES, limit
        try:
            t = time.perf_counter()
            chosen[name] = depth.plan_depth(teacher, build_model(args.student), "greedy", error).selections
            rows[name] = {"seconds": time.perf_counter() - t}
        finally:
            depth.REPLAY_BYTES = saved
    if chosen["replayed"] != chosen["full"]:
        raise SystemExit(f"the replayed trials chose {chosen['replayed']}, the full ones {chosen['full']}")
    speedup = rows["full"]["seconds"] / rows["replayed"]["seconds"]
    for name, row in rows.items():
        print(f"{name:>8}: {row['seconds']:.1f} s")
    print(f"replayed trials: {speedup:.2f}x faster, the same units {chosen['full']}")
    if args.out:
        atomic_write_json(Path(args.out), {
            "command": "python benchmarks/greedy_speed.py " + " ".join(sys.argv[1:]), "commit": git_commit(),
            "device": device_description(torch.device("cpu")), "threads": torch.get_num_threads(), "seed": 0,
            "teacher": args.teacher, "student": args.student, "images": args.images, "rows": rows,
            "speedup": speedup, "units": chosen["full"], "wall_seconds": time.perf_counter() - started})


if __name__ == "__main__":
    main()
