"""SAKD's step against the standard distillation step, measured in one run on one machine.

    python benchmarks/sakd_speed.py --teacher wrn_40_2 --student shufflev1 --distiller at \\
        --out benchmarks/results/sakd_speed-cpu.json

Both steps run through ``graftkd.distill.fulldata.train_kd`` (the code every SAKD grid cell runs) on the same
synthetic CIFAR-100-shaped batch stream, random weights: ``adaptive none`` (CE + KD + the distiller at fixed
spots), ``adaptive sakd`` (the same plus the policy, the routing pass and the agent's update on every step)
and ``agent_every 2`` (the routing pass and the agent's update on every other step). Rounds
alternate the two so that machine noise hits both alike; the ratio of the medians is the figure
(target: at most 2). Threads are pinned.

The same rounds also time the routing pass's irreducible parts, each on its own: the frozen teacher's
segments after the first spot (forward, then the gradient to their input: the agent's loss reaches the
decisions and adapters upstream through them), the frozen student's segments in eval mode (the same), and the
adapters (forward and backward, their weights train). No implementation of the reference's routing network
can skip any of them, so ``floor_over_standard`` = (standard step + the parts) / standard step is the lowest
ratio a SAKD step can reach with these kernels, and ``sakd_over_floor`` says how far the step is above it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from graftkd.data.normalize import Normalizer  # noqa: E402
from graftkd.distill.fulldata import KDRecipe, _build_adaptive, spot_distiller, train_kd  # noqa: E402
from graftkd.engine.distributed import World  # noqa: E402
from graftkd.engine.runtime import autocast, machine_facts, run_facts  # noqa: E402
from graftkd.files import atomic_write_json  # noqa: E402
from graftkd.models import build_model  # noqa: E402


VARIANTS = {"standard": {"adaptive": "none"}, "sakd": {"adaptive": "sakd"},
            "sakd-agent-every-2": {"adaptive": "sakd", "agent_every": 2}}


def _seconds_per_image(teacher, student_arch, teacher_arch, images, labels, variant: dict, distiller, batch,
                       classes, precision: str) -> tuple[float, float, dict]:
    torch.manual_seed(0)
    student = build_model(student_arch, num_classes=classes)
    recipe = KDRecipe(epochs=1, batch_size=batch, lr=0.01, milestones=[10], distiller=distiller,
                      precision=precision, seed=0, eval_every=0, **variant)
    started = time.perf_counter()
    out = train_kd(student, teacher, (images, labels), normalize=Normalizer((0.5,) * 3, (0.25,) * 3), recipe=recipe,
                   device=torch.device("cpu"), student_arch=student_arch, teacher_arch=teacher_arch, progress=False)
    wall = time.perf_counter() - started
    setting = {"precision": out["precision"],
               "channels_last": bool(out["speed"] and out["speed"]["chosen"]["channels_last"])}
    return 1.0 / out["history"][-1]["images_per_second"], wall, setting


def _routing_parts(teacher, student_arch, teacher_arch, images, distiller, batch, classes, setting: dict
                   ) -> dict[str, float]:
    """Seconds per image of each irreducible part of one routing pass, on the first batch (see the docstring),
    in the precision and memory format that the steps ran in."""
    torch.manual_seed(0)
    student = build_model(student_arch, num_classes=classes).eval()
    for p in student.parameters():
        p.requires_grad_(False)
    normalize = Normalizer((0.5,) * 3, (0.25,) * 3)
    sample = normalize(images[:2])
    spot_net, s_paths, t_paths = spot_distiller(distiller, student, teacher, sample)
    recipe = KDRecipe(distiller=distiller, adaptive="sakd", precision="fp32")
    agent, _, _ = _build_adaptive(recipe, student, teacher, spot_net, s_paths, t_paths, sample, student_arch,
                                  teacher_arch, World(), torch.device("cpu"))
    router = agent.router
    precision, device = setting["precision"], torch.device("cpu")
    memory_format = torch.channels_last if setting["channels_last"] else torch.contiguous_format
    for module in (student, teacher, router):
        module.to(memory_format=memory_format)
    (s_first, t_first), last = router.spots[0], (len(student.stage_parts()) - 1, len(teacher.stage_parts()) - 1)
    x = normalize(images[:batch]).contiguous(memory_format=memory_format)
    with torch.no_grad(), autocast(device, precision):
        s_in = student.run_stages(x, 0, s_first)
        t_in = teacher.run_stages(x, 0, t_first)
        s_spots = [s_in] + [student.run_stages(x, 0, si) for si, _ in router.spots[1:]]
        t_spots = [t_in] + [teacher.run_stages(x, 0, ti) for _, ti in router.spots[1:]]

    def vjp(model, start, end, u):
        u = u.clone().requires_grad_(True)
        with autocast(device, precision):
            out = model.run_stages(u, start, end)
        out.float().sum().backward()

    def adapters():
        for k, (hint, anti) in enumerate(zip(router.hint, router.anti_hint)):
            # the first spot's inputs carry no gradient (nothing upstream of them trains); the later ones do
            s_k, t_k = (s_spots[k], t_spots[k]) if k == 0 else (s_spots[k].clone().requires_grad_(True),
                                                                 t_spots[k].clone().requires_grad_(True))
            with autocast(device, precision):
                total = hint(s_k).float().sum() + anti(t_k).float().sum()
            total.backward()

    parts = {"teacher_vjp": lambda: vjp(teacher, t_first + 1, last[1], t_in),
             "student_vjp": lambda: vjp(student, s_first + 1, last[0], s_in), "adapters": adapters}
    out = {}
    for name, part in parts.items():
        part()  # picks kernels: not timed
        started = time.perf_counter()
        part()
        out[name] = (time.perf_counter() - started) / batch
    router.zero_grad(set_to_none=True)
    teacher.to(memory_format=torch.contiguous_format)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="wrn_40_2")
    parser.add_argument("--student", default="shufflev1")
    parser.add_argument("--distiller", default="at")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                        help="fp32 (default, the committed figure's), bf16, or auto: the setting `graftkd train-kd` "
                             "picks on this machine (timed once and remembered, memory format included)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    n = args.batch_size * args.steps
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, args.classes, (n,), generator=g)
    torch.manual_seed(0)
    teacher = build_model(args.teacher, num_classes=args.classes).eval()
    rows: dict[str, list[float]] = {name: [] for name in VARIANTS}
    walls: dict[str, list[float]] = {name: [] for name in VARIANTS}
    parts: dict[str, list[float]] = {}
    _, _, setting = _seconds_per_image(teacher, args.student, args.teacher, images[: 2 * args.batch_size],
                                       labels[: 2 * args.batch_size], VARIANTS["sakd"], args.distiller,
                                       args.batch_size, args.classes, args.precision)  # warm-up
    for _ in range(args.rounds):
        for name, variant in VARIANTS.items():
            per_image, wall, _ = _seconds_per_image(teacher, args.student, args.teacher, images, labels, variant,
                                                    args.distiller, args.batch_size, args.classes, args.precision)
            rows[name].append(per_image)
            walls[name].append(wall)
        for name, per_image in _routing_parts(teacher, args.student, args.teacher, images, args.distiller,
                                              args.batch_size, args.classes, setting).items():
            parts.setdefault(name, []).append(per_image)
    medians = {k: statistics.median(v) for k, v in rows.items()}
    part_medians = {k: statistics.median(v) for k, v in parts.items()}
    floor = medians["standard"] + sum(part_medians.values())
    payload = {**run_facts(torch.device("cpu"), seed=0), "machine": machine_facts(torch.device("cpu")),
               "benchmark": "sakd_speed", "teacher": args.teacher, "student": args.student,
               "distiller": args.distiller, "batch_size": args.batch_size, "steps_per_round": args.steps,
               "rounds": args.rounds, "threads": torch.get_num_threads(),
               "precision_asked": args.precision, "setting": setting,
               "images_per_second": {k: 1.0 / v for k, v in medians.items()},
               "sakd_over_standard": medians["sakd"] / medians["standard"],
               "sakd_agent_every_2_over_standard": medians["sakd-agent-every-2"] / medians["standard"],
               "routing_parts_seconds_per_image": part_medians,
               "floor_over_standard": floor / medians["standard"], "sakd_over_floor": medians["sakd"] / floor,
               "per_round_seconds_per_image": rows, "per_round_routing_parts": parts,
               "per_round_wall_seconds": walls, "target": "<= 2",
               "wall_seconds": time.perf_counter() - started}
    print(f"{args.teacher} -> {args.student} ({args.distiller}): standard {1 / medians['standard']:.1f} img/s, "
          f"SAKD {1 / medians['sakd']:.1f} img/s (ratio {payload['sakd_over_standard']:.2f}), agent every 2nd step "
          f"{1 / medians['sakd-agent-every-2']:.1f} img/s (ratio {payload['sakd_agent_every_2_over_standard']:.2f}); "
          f"the routing pass's irreducible parts alone put the floor at {payload['floor_over_standard']:.2f}x "
          f"(" + ", ".join(f"{k} {v / medians['standard']:.2f}" for k, v in part_medians.items())
          + f" of a standard step); SAKD is {payload['sakd_over_floor']:.2f}x its floor")
    if args.out:
        atomic_write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
