"""Speed of making synthetic images (``graftkd.engine.inversion``): the BatchNorm gap measured over the rows of an
(N·H·W, C) view (``batch_gap``, the library's) against the same statistics reduced over dims (0, 2, 3), in one
run on one machine, interleaved.

    python benchmarks/synth_speed.py --out benchmarks/results/synth_speed-cpu.json

ResNet-56 on random weights with BatchNorm statistics re-estimated on other random images, batches of
``--batch`` (the library's 200 by default), bf16 autocast where the CPU runs it natively, as the library does.
The timed unit is one ``invert_batchnorm`` call of ``--steps`` steps on one batch. Runs from a fresh clone.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import graftkd.engine.inversion as inversion  # noqa: E402
from graftkd.data.normalize import Normalizer  # noqa: E402
from graftkd.engine.bn import reestimate_batchnorm  # noqa: E402
from graftkd.engine.runtime import device_description, git_commit, native_bf16  # noqa: E402
from graftkd.files import atomic_write_json  # noqa: E402
from graftkd.models import build_model  # noqa: E402


def dims_gap(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """The reference: the same gap, reduced over dims (0, 2, 3) of the batch."""
    x = x.float()
    return (torch.linalg.vector_norm(x.mean(dim=(0, 2, 3)) - mean)
            + torch.linalg.vector_norm(x.var(dim=(0, 2, 3), unbiased=False) - var))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--steps", type=int, default=3, help="inversion steps per timed call")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median call is reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    norm = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    model = build_model(args.model)
    with torch.no_grad():
        reestimate_batchnorm(model, [norm(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8))])
    model.eval()
    images = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)
    bf16 = native_bf16(torch.device("cpu"))
    spec = inversion.Inversion(args.batch, steps=args.steps, batch_size=args.batch)
    variants = {"rows_view": inversion.batch_gap, "dims_0_2_3": dims_gap}
    times: dict[str, list[float]] = {name: [] for name in variants}
    made = {}
    library = inversion.batch_gap
    try:
        for round_ in range(args.rounds + 1):  # the first round warms up (oneDNN primitives, allocator)
            for name, gap in variants.items():
                inversion.batch_gap = gap
                t = time.perf_counter()
                made[name], _ = inversion.invert_batchnorm(model, norm, images, spec,
                                                           generator=torch.Generator().manual_seed(0), num_classes=10,
                                                           precision=torch.bfloat16 if bf16 else None)
                if round_:
                    times[name].append(time.perf_counter() - t)
    finally:
        inversion.batch_gap = library
    median = {name: statistics.median(ts) for name, ts in times.items()}
    speedup = median["dims_0_2_3"] / median["rows_view"]
    differ = float((made["rows_view"].int() - made["dims_0_2_3"].int()).abs().float().mean())
    for name in variants:
        print(f"{name:>10}: {median[name] / args.steps:.3f} s/step ({args.batch * args.steps / median[name]:.0f} "
              f"image-steps/s)")
    print(f"rows view: {speedup:.2f}x faster; the images differ by {differ:.3f} grey levels on average (rounding)")
    if args.out:
        atomic_write_json(Path(args.out), {
            "command": "python benchmarks/synth_speed.py " + " ".join(sys.argv[1:]), "commit": git_commit(),
            "device": device_description(torch.device("cpu")), "threads": torch.get_num_threads(), "seed": 0,
            "bf16": bool(bf16), "model": args.model, "batch": args.batch, "steps": args.steps,
            "seconds_per_step": {name: median[name] / args.steps for name in variants}, "speedup": speedup,
            "mean_abs_difference_grey_levels": differ, "wall_seconds": time.perf_counter() - started})


if __name__ == "__main__":
    main()
