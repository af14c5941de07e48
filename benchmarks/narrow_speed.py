"""Speed of fading the dropped channels (``NarrowingStudent``) against training the narrow student itself.

One KD step on the patient recipe's shapes (batch 64, 32x32, bf16 autocast on CPUs that have it, SGD with
momentum), with the frozen teacher's forward included, timed interleaved in one run on one machine for:

- ``plain``: the derived narrow student (what the repaired path trains);
- ``fading``: the ``NarrowingStudent`` while the channels fade (a full-width teacher copy is trained);
- ``narrow``: the ``NarrowingStudent`` after the switch (the student module on the kept slices).

Ratios are to ``plain``. A run whose fading share is ``s`` costs about ``s * fading + (1 - s) * narrow``.

    python benchmarks/narrow_speed.py --out benchmarks/results/narrow_speed-cpu.json

Random weights, so it runs from a fresh clone.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from graftkd.derive import derive_student  # noqa: E402
from graftkd.derive.fade import NarrowingStudent  # noqa: E402
from graftkd.distill.losses import kd_loss  # noqa: E402
from graftkd.engine.bn import reestimate_batchnorm  # noqa: E402
from graftkd.engine.runtime import device_description, git_commit, native_bf16  # noqa: E402
from graftkd.files import atomic_write_json  # noqa: E402
from graftkd.models import build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="vgg16_bn")
    parser.add_argument("--student", default="vgg16_half_bn")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per setting and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median step is reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    teacher = build_model(args.teacher).to(memory_format=fmt)
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=fmt)
    with torch.no_grad():  # statistics of the random teacher's own activations: no exploding (or denormal) values
        reestimate_batchnorm(teacher, [x])
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    derived = build_model(args.student)
    record = derive_student(teacher, derived, (3, 32, 32))
    plain = build_model(args.student)
    plain.load_state_dict(derived.state_dict())
    fading = NarrowingStudent(teacher, derived, record, steps=10**9)
    narrow = NarrowingStudent(teacher, derived, record, steps=1)
    narrow.seen = 1  # past the fade: the student module on the kept slices
    models = {"plain": plain, "fading": fading, "narrow": narrow}
    optimizers = {}
    for name, model in models.items():
        model.to(memory_format=fmt).train()
        optimizers[name] = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    bf16 = native_bf16(torch.device("cpu"))

    def step(name: str) -> None:
        model, optimizer = models[name], optimizers[name]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                target = teacher(x)
            out = model(x)
        loss = kd_loss(out.float(), target.float(), 4.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times: dict[str, list[float]] = {name: [] for name in models}
    for name in models:  # warm-up (allocator, oneDNN primitives: the first backward passes take seconds)
        for _ in range(4):
            step(name)
    for _ in range(args.rounds):
        for name in models:
            for _ in range(args.steps):
                t = time.perf_counter()
                step(name)
                times[name].append(time.perf_counter() - t)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    rows = {name: {"seconds_per_step": median[name], "images_per_second": args.batch / median[name],
                   "ratio_to_plain": median[name] / median["plain"]} for name in models}
    for name, row in rows.items():
        print(f"{name:>7}: {row['seconds_per_step']:.3f} s/step, {row['images_per_second']:.0f} img/s, "
              f"{row['ratio_to_plain']:.2f}x plain")
    share = 0.25
    cost = share * rows["fading"]["ratio_to_plain"] + (1 - share) * rows["narrow"]["ratio_to_plain"]
    print(f"a run fading over {share:g} of its steps: {cost:.2f}x the plain student's time")
    if args.out:
        atomic_write_json(Path(args.out), {
            "command": "python benchmarks/narrow_speed.py " + " ".join(sys.argv[1:]), "commit": git_commit(),
            "device": device_description(torch.device("cpu")), "threads": torch.get_num_threads(), "seed": 0,
            "bf16": bool(bf16), "channels_last": args.channels_last, "batch": args.batch, "teacher": args.teacher,
            "student": args.student, "rows": rows, "fade_share": share, "run_cost_vs_plain": cost,
            "wall_seconds": time.perf_counter() - started})


if __name__ == "__main__":
    main()
