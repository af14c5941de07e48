"""Sharing the CPU: how OpenMP's waiting policy changes graftkd's speed when another process trains beside it.

    python benchmarks/omp_wait.py --out benchmarks/results/omp_wait-cpu.json

PyTorch's CPU kernels run on OpenMP threads that, by default, spin for a while at the end of every parallel
region instead of sleeping. On a machine of its own that saves a little latency. When a second process keeps
the same cores busy (a grid cell beside a test run, two users on one box), a thread that is descheduled makes
the others spin through their time slices, and every small kernel waits for it: small forwards slow down by
an order of magnitude. ``OMP_WAIT_POLICY=PASSIVE`` makes the threads sleep instead.

Each case is a fresh process (the policy is read when the OpenMP runtime starts), timing, with random weights:

* ``forward10``: a ResNet-56 forward of 10 images (the size of the greedy depth search's and the label-free
  estimate's batches), median seconds of 20;
* ``kd_step``: a ResNet-56 -> ResNet-20 KD step at batch 64, fp32 (teacher forward, student forward and
  backward, SGD), images per second over 30 steps after 3 warm-up steps.

Both under two policies (the runtime's default, and PASSIVE), on a quiet machine and beside a *load*: another
process running the same KD step in a loop on all threads with the default policy, as another graftkd run
would. Every case runs once per round (``--rounds``, default 3), rounds interleaved so drift hits every case
alike; the table reports each case's median and every value, and the ratios use the medians. Two single-round
runs on the same machine differed a lot (beside the load, the default policy lost 14x in one and 1.35x in the
other), which is why there are rounds. The machine must be otherwise quiet for the quiet cases to mean
anything.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CASE = r"""
import json, statistics, sys, time, torch
torch.manual_seed(0)
from graftkd.models import build_model
what, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
teacher = build_model("resnet56", num_classes=10).eval()
if what == "forward10":
    x = torch.randn(10, 3, 32, 32)
    with torch.no_grad():
        for _ in range(3):
            teacher(x)
        times = []
        for _ in range(20):
            t = time.perf_counter(); teacher(x); times.append(time.perf_counter() - t)
    print(json.dumps({"seconds": statistics.median(times)}))
else:
    student = build_model("resnet20", num_classes=10).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(64, 3, 32, 32)
    def step():
        with torch.no_grad():
            target = teacher(x).softmax(1)
        loss = -(target * student(x).log_softmax(1)).sum(1).mean()
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    for _ in range(3):
        step()
    steps = 30 if what == "kd_step" else 10**9  # "load": until killed
    t = time.perf_counter()
    for _ in range(steps):
        step()
    print(json.dumps({"images_per_second": 64 * steps / (time.perf_counter() - t)}))
"""


def _env(policy: str | None) -> dict:
    """This environment with the given wait policy (None: the runtime's default) and graftkd's sources."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    env["PYTHONPATH"] = str(ROOT / "src")
    return env


def _case(what: str, threads: int, policy: str | None) -> dict:
    done = subprocess.run([sys.executable, "-c", CASE, what, str(threads)], env=_env(policy), capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads of the timed process and of the load (default: every core)")
    parser.add_argument("--rounds", type=int, default=3, help="times every case is measured (default 3)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    import torch

    from graftkd.engine.runtime import run_facts
    from graftkd.files import atomic_write_json

    started = time.perf_counter()
    facts = run_facts(torch.device("cpu"))
    rows = []
    for round_ in range(args.rounds):
        for load in ("quiet", "busy"):
            background = None
            if load == "busy":
                background = subprocess.Popen([sys.executable, "-c", CASE, "load", str(args.threads)],
                                              env=_env(None), stdout=subprocess.DEVNULL)
                time.sleep(8)  # the load past its imports and warm-up
            try:
                for policy in (None, "PASSIVE"):
                    for what in ("forward10", "kd_step"):
                        result = _case(what, args.threads, policy)
                        rows.append({"round": round_, "load": load, "policy": policy or "default", "case": what,
                                     **result})
                        print(json.dumps(rows[-1]), flush=True)
            finally:
                if background is not None:
                    background.kill()
                    background.wait()

    import statistics

    def values(load, policy, case):
        return [r.get("seconds") or r.get("images_per_second") for r in rows
                if (r["load"], r["policy"], r["case"]) == (load, policy, case)]

    def value(load, policy, case):
        return statistics.median(values(load, policy, case))

    medians = {f"{load}, {policy}, {case}": {"median": round(value(load, policy, case), 4),
                                              "all": [round(v, 4) for v in values(load, policy, case)]}
               for load in ("quiet", "busy") for policy in ("default", "PASSIVE") for case in ("forward10", "kd_step")}

    ratios = {
        # > 1: PASSIVE is faster (forward: time ratio default / passive; KD step: throughput passive / default)
        f"{load}: {case}, PASSIVE over default": round(
            value(load, "default", case) / value(load, "PASSIVE", case) if case == "forward10"
            else value(load, "PASSIVE", case) / value(load, "default", case), 3)
        for load in ("quiet", "busy") for case in ("forward10", "kd_step")
    }
    payload = {**facts, "threads": args.threads, "rounds": args.rounds, "rows": rows, "medians": medians,
               "speedup_of_passive": ratios,
               "wall_seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(ratios, indent=1))
    if args.out:
        atomic_write_json(Path(args.out), payload)
    return payload


if __name__ == "__main__":
    main()
