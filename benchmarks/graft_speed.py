"""Grafting speed: per-stage throughput, step overhead over its irreducible parts, and per-epoch eval cost.

Why: few-shot grafting should cost minutes. This measures, in one run on one machine, for the paper's
setting shapes (10-shot CIFAR-10, VGG16-BN teacher -> vgg16_graft_bn student, random weights):

1. **Overhead ratio** per stage: the median time of one real grafting step (``GraftRunner.train_step``:
   augmentation, normalisation, teacher pass, grafted pass, loss, backward, Adam) divided by the sum of
   its irreducible parts timed in isolation on the same batch: one teacher-prefix forward, one
   teacher-suffix forward (the target), one scion+suffix forward/backward. Target <= 1.15. The same
   ratio for a "reference-style" step (full teacher forward for the target, full grafted forward with
   the teacher prefix computed again) shows what sharing the prefix saves.
2. **A full run** of block + network grafting at the reference schedule (``preset cifar10``: block
   stages 100/60 epochs, network stages 100) through ``graftkd.graft.graft``: images/s per stage.
3. **Per-epoch test evaluation**, as the reference code does after every epoch: one sweep of a
   10,000-image test set through the grafted net is timed and, by default, multiplied by the number of
   epochs (``--eval estimate``, labelled so in the output); ``--eval full`` runs it for real.
4. **An audit and a profile of steps** of the heaviest stage: module calls per step (teacher prefix
   blocks must run once) and device->host reads (must be none), plus the profiler's top ops.

    python benchmarks/graft_speed.py --out benchmarks/results/graft_speed-cpu.json

Everything is synthetic (random weights, random uint8 images), so it runs from a fresh clone.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from graftkd.data.augment import random_crop_flip  # noqa: E402
from graftkd.data.normalize import Normalizer  # noqa: E402
from graftkd.engine.audit import StepAudit, optimizer_step_counters  # noqa: E402
from graftkd.engine.evaluate import predict_logits  # noqa: E402
from graftkd.files import atomic_write_json, atomic_write_text  # noqa: E402
from graftkd.engine.runtime import (  # noqa: E402
    autocast,
    machine_facts,
    resolve_device,
    resolve_precision,
    run_facts,
    seed_everything,
    synchronize,
)
from graftkd.graft import GraftConfig, ScheduleConfig, build_plan, build_schedule, graft  # noqa: E402
from graftkd.graft.loss import normalized_logit_loss  # noqa: E402
from graftkd.graft.schedule import batch_size_for  # noqa: E402
from graftkd.graft.train import GraftRunner  # noqa: E402
from graftkd.models import build_model  # noqa: E402

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _interleaved(fns: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, measured round-robin so machine noise hits all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def _models(args) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = build_model(args.teacher, num_classes=args.classes).eval()
    student = build_model(args.student, num_classes=args.classes)
    return teacher, student


def _runner(args, device, precision: str, channels_last: bool, images: torch.Tensor):
    teacher, student = _models(args)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    teacher.to(device=device, memory_format=fmt)
    student.to(device=device, memory_format=fmt)
    plan = build_plan(teacher, student, images.shape[1:])
    batch = batch_size_for(args.shots, len(images))
    stages = build_schedule(plan, ScheduleConfig(preset="cifar10"), batch)
    runner = GraftRunner(
        plan, images, normalize=Normalizer(CIFAR_MEAN, CIFAR_STD),
        augment=lambda x, g: random_crop_flip(x, padding=4, flip=True, generator=g),
        batch_size=batch, generator=torch.Generator().manual_seed(0), device=device, precision=precision,
        channels_last=channels_last, progress=False,
    )
    return runner, stages, batch


def measure_overhead(runner: GraftRunner, stage, batch: int, device, repeats: int, warmup: int) -> dict:
    """Step time / (prefix fwd + suffix fwd + scion fwd/bwd), each timed alone on the same batch."""
    runner.set_modes(stage)
    optimizer = runner.make_optimizer(stage)
    prefix, replaced = runner.prefix_length(stage), set(stage.replaced)
    indices = torch.arange(batch, device=device)
    blocks = runner.plan.teacher_blocks
    x = runner._batch_input(indices)
    with torch.no_grad(), autocast(device, runner.precision):
        features = x
        for i in range(prefix):
            features = blocks[i](features)
        target = runner._run_from(features, prefix, set()).float()

    def step() -> None:
        runner.train_step(indices, prefix, replaced, optimizer)

    def prefix_forward() -> None:
        with torch.no_grad(), autocast(device, runner.precision):
            h = x
            for i in range(prefix):
                h = blocks[i](h)

    def suffix_forward() -> None:
        with torch.no_grad(), autocast(device, runner.precision):
            runner._run_from(features, prefix, set())

    def scion_forward_backward() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, runner.precision):
            output = runner._run_from(features, prefix, replaced)
        normalized_logit_loss(output, target).backward()

    def reference_style_step() -> None:
        # What the reference does: the whole teacher for the target, then the whole grafted net from the
        # input (the prefix computed a second time), backward, Adam.
        xb = runner._batch_input(indices)
        with torch.no_grad(), autocast(device, runner.precision):
            tgt = runner._run_from(xb, 0, set()).float()
        with autocast(device, runner.precision):
            output = runner._run_from(xb, 0, replaced)
        loss = normalized_logit_loss(output, tgt)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    fns = {"step": step, "prefix_forward": prefix_forward, "suffix_forward": suffix_forward,
           "scion_forward_backward": scion_forward_backward, "reference_style_step": reference_style_step}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    medians = _interleaved(fns, device, repeats)
    parts = medians["prefix_forward"] + medians["suffix_forward"] + medians["scion_forward_backward"]
    return {
        "stage": stage.name, "prefix_blocks": prefix, "batch": batch,
        "median_ms": {k: round(v * 1e3, 3) for k, v in medians.items()},
        "irreducible_ms": round(parts * 1e3, 3),
        "overhead_ratio": round(medians["step"] / parts, 3),
        "reference_style_ratio": round(medians["reference_style_step"] / parts, 3),
        "step_speedup_vs_reference_style": round(medians["reference_style_step"] / medians["step"], 3),
    }


def audit_and_profile(runner: GraftRunner, stage, batch: int, device, steps: int = 3) -> tuple[dict, str]:
    runner.set_modes(stage)
    optimizer = runner.make_optimizer(stage)
    prefix, replaced = runner.prefix_length(stage), set(stage.replaced)
    indices = torch.arange(batch, device=device)
    runner.train_step(indices, prefix, replaced, optimizer)
    modules = {f"teacher block {i + 1}": b for i, b in enumerate(runner.plan.teacher_blocks)}
    modules.update({f"scion {i + 1}": runner.plan.scions[i] for i in stage.replaced})
    with StepAudit(modules, allowed=optimizer_step_counters(optimizer)) as audit:
        for _ in range(steps):
            runner.train_step(indices, prefix, replaced, optimizer)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            runner.train_step(indices, prefix, replaced, optimizer)
        synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25)
    return {
        "stage": stage.name, "steps": steps, "prefix_blocks": prefix,
        "module_calls_per_step": {k: v / steps for k, v in sorted(audit.calls.items())},
        "device_syncs": dict(audit.syncs), "model_tensor_reads": dict(audit.model_reads),
        "cpu_counter_reads_per_step": {k: v / steps for k, v in audit.allowed_reads.items()},
        "prefix_blocks_run_once": all(audit.calls[f"teacher block {i + 1}"] == steps for i in range(prefix)),
    }, table


def compare_formats(args, device, images: torch.Tensor, repeats: int) -> list[dict]:
    """Step time of the first stage under each precision x memory format (informs the defaults)."""
    rows = []
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            runner, stages, batch = _runner(args, device, precision, channels_last, images)
            stage = stages[0]
            runner.set_modes(stage)
            optimizer = runner.make_optimizer(stage)
            prefix, replaced = runner.prefix_length(stage), set(stage.replaced)
            indices = torch.arange(batch, device=device)
            for _ in range(3):
                runner.train_step(indices, prefix, replaced, optimizer)
            seconds = _median_seconds(lambda: runner.train_step(indices, prefix, replaced, optimizer), device, repeats)
            rows.append({"precision": precision, "channels_last": channels_last, "stage": stage.name,
                         "step_ms": round(seconds * 1e3, 3), "images_per_second": round(batch / seconds, 1)})
            print(f"  {stage.name:<18} {precision:<5} channels_last={channels_last!s:<5} {seconds * 1e3:8.2f} ms/step",
                  flush=True)
    base = rows[0]["step_ms"]
    for row in rows:
        row["speedup_vs_fp32_contiguous"] = round(base / row["step_ms"], 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="vgg16_bn")
    parser.add_argument("--student", default="vgg16_graft_bn")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="auto = bf16 on CUDA, fp32 on CPU (graft's default)")
    parser.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                        help="auto = on for CUDA (graft's default)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions per part (medians reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--eval", choices=("estimate", "full", "off"), default="estimate",
                        help="per-epoch test evaluation: timed sweep x epochs (estimate), or run for real (full)")
    parser.add_argument("--epochs-scale", type=float, default=1.0,
                        help="multiply the reference epochs (1.0 = the reference schedule; <1 for a smoke run)")
    parser.add_argument("--skip-formats", action="store_true", help="skip the precision x memory-format table")
    parser.add_argument("--out", default="benchmarks/results/graft_speed.json")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    precision = resolve_precision(device, args.precision)
    channels_last = device.type == "cuda" if args.channels_last == "auto" else args.channels_last == "on"
    started = time.perf_counter()
    seed_everything(0)
    images = torch.randint(0, 256, (args.shots * args.classes, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    payload: dict = {**run_facts(device, seed=0), "machine": machine_facts(device), "benchmark": "graft_speed",
                     "teacher": args.teacher, "student": args.student, "shots": args.shots, "classes": args.classes,
                     "precision": precision, "channels_last": channels_last, "repeats": args.repeats}
    print(f"device {payload['device']}; precision {precision}; channels_last {channels_last}", flush=True)

    # 1. overhead ratio per stage (fresh runner; weights are random and training does not matter here)
    runner, stages, batch = _runner(args, device, precision, channels_last, images)
    overhead = []
    for stage in stages:
        row = measure_overhead(runner, stage, batch, device, args.repeats, args.warmup)
        overhead.append(row)
        print(f"  {row['stage']:<18} step {row['median_ms']['step']:8.2f} ms  irreducible {row['irreducible_ms']:8.2f} ms"
              f"  ratio {row['overhead_ratio']:.3f}  (reference-style {row['reference_style_ratio']:.3f})", flush=True)
    payload["overhead"] = overhead
    payload["overhead_ratio_max"] = max(r["overhead_ratio"] for r in overhead)
    heaviest = max(stages, key=lambda s: next(r for r in overhead if r["stage"] == s.name)["median_ms"]["step"])
    audit, table = audit_and_profile(runner, heaviest, batch, device)
    payload["audit"] = audit
    profile_path = Path(args.out).with_suffix(".profile.txt")
    atomic_write_text(profile_path, f"# {payload['command']}\n# {payload['device']}, stage {heaviest.name}, "
                                    f"{audit['steps']} steps\n{table}\n")
    payload["profile_table"] = str(profile_path)
    del runner

    # 2. the full reference schedule through the public API
    epochs_scale = args.epochs_scale
    schedule = ScheduleConfig(preset="cifar10")
    if epochs_scale != 1.0:
        from graftkd.graft.schedule import PRESETS

        ref = PRESETS["cifar10"]
        schedule = ScheduleConfig(preset="cifar10",
                                  block_epochs=[max(1, round(e * epochs_scale)) for e in ref["block_epochs"]],
                                  net_epochs=[max(1, round(e * epochs_scale)) for e in ref["net_epochs"]])
    config = GraftConfig(shots=args.shots, schedule=schedule, seed=0, precision=precision,
                         channels_last=channels_last)
    teacher, student = _models(args)
    result = graft(copy.deepcopy(teacher), student, images, normalize=Normalizer(CIFAR_MEAN, CIFAR_STD),
                   config=config, device=device, progress=False)
    epochs = sum(s.epochs for s in result.stages)
    payload["run"] = {
        "schedule": "reference (preset cifar10)" if epochs_scale == 1.0 else f"reference x {epochs_scale}",
        "epochs": epochs, "seconds": round(result.seconds, 2),
        "stages": [{"stage": s.name, "epochs": s.epochs, "images": r["images"], "seconds": round(r["seconds"], 2),
                    "images_per_second": round(r["images_per_second"], 1)} for s, r in zip(result.stages, result.records)],
    }
    print(f"  full run: {epochs} epochs in {result.seconds:.1f} s", flush=True)
    for row in payload["run"]["stages"]:
        print(f"    {row['stage']:<18} {row['images_per_second']:8.1f} img/s ({row['epochs']} epochs, {row['seconds']} s)")

    # 3. per-epoch test evaluation (the reference schedule evaluates after every epoch)
    if args.eval != "off":
        test = torch.randint(0, 256, (args.test_images, 3, 32, 32), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(2))
        normalize = Normalizer(CIFAR_MEAN, CIFAR_STD)
        model = result.student.to(device).eval()
        sweep = _median_seconds(lambda: predict_logits(model, test, normalize, device, batch_size=500,
                                                       precision=precision, channels_last=channels_last), device, 2)
        entry = {"test_images": args.test_images, "sweep_seconds": round(sweep, 2), "epochs": epochs}
        if args.eval == "full":
            teacher2, student2 = _models(args)
            eval_config = dataclasses.replace(config, eval_every=1)

            def hook(forward) -> float:
                predict_logits(forward, test, normalize, device, batch_size=500, precision=precision,
                               channels_last=channels_last)
                return 0.0

            with_eval = graft(teacher2, student2, images, normalize=normalize, config=eval_config, device=device,
                              progress=False, eval_hook=hook)
            entry.update(mode="measured", seconds_with_per_epoch_eval=round(with_eval.seconds, 2))
        else:
            entry.update(mode="estimated: run seconds + epochs x measured sweep",
                         seconds_with_per_epoch_eval=round(result.seconds + epochs * sweep, 2))
        entry["slowdown_vs_no_eval"] = round(entry["seconds_with_per_epoch_eval"] / result.seconds, 2)
        payload["per_epoch_eval"] = entry
        print(f"  one test sweep {sweep:.2f} s; with per-epoch eval ({entry['mode']}): "
              f"{entry['seconds_with_per_epoch_eval']:.0f} s = {entry['slowdown_vs_no_eval']}x", flush=True)

    # 4. precision x memory format for one step (what the defaults should be on this machine)
    if not args.skip_formats:
        payload["formats"] = compare_formats(args, device, images, max(5, args.repeats // 2))

    payload["wall_seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(Path(args.out), payload)
    verdict = "OK" if payload["overhead_ratio_max"] <= 1.15 else "ABOVE TARGET"
    print(f"overhead ratio (max over stages) {payload['overhead_ratio_max']:.3f} (target <= 1.15: {verdict}); "
          f"prefix blocks run once per step: {audit['prefix_blocks_run_once']}; device syncs per step: "
          f"{sum(audit['device_syncs'].values())}; wrote {args.out} in {payload['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
