"""Development probe, scored on the fixed labeled *validation* split (never test): does fading the dropped
units out gradually beat dropping them at once?

    python benchmarks/derived/fade_probe.py --samples 128000 --fade 0.25 --k 10 --seed 0

The student starts as the whole teacher (ResNet-56). Every unit the depth derivation drops (the same plan
`graftkd distill` makes: evenly spaced units) is blended out, ``y = a * unit(x) + (1 - a) * x``, with ``a``
going linearly from 1 to 0 over the first ``--fade`` share of the sample budget, while the network trains
by KD on the patient recipe's mixed views. At ``a = 0`` a dropped unit is the identity, so the units are
then cut out (the kept ones keep their parameters and momentum) and KD goes on with the plain student
for the rest of the budget. ``--fade 0`` is the usual derived start (BatchNorm re-estimated on the
few-shot images), trained by this same loop: the control. BatchNorm is re-estimated at the end on
un-mixed views, as the recipe does.

One small loop on purpose (no resume, no checkpoints): a probe to decide whether the idea earns a place in
the library's loop. One JSON file per run under --out (command, commit, device, threads, wall time).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=128_000)
    parser.add_argument("--fade", type=float, default=0.25, help="share of the budget over which units fade out")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--out", default="results/cifar10-derived/dev-amx")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from graftkd.data import load_dataset, resolve_augment
    from graftkd.data.batcher import FewShotBatcher
    from graftkd.data.dataset import ImageSet
    from graftkd.data.fewshot import make_manifest, validation_indices
    from graftkd.derive.depth import plan_depth
    from graftkd.distill.losses import kd_loss
    from graftkd.engine.bn import reestimate_batchnorm
    from graftkd.engine.evaluate import evaluate_model
    from graftkd.engine.runtime import device_description, git_commit
    from graftkd.files import atomic_write_json
    from graftkd.models import build_model
    from graftkd.loaded import load_teacher, normalizer

    name = f"fade{args.fade:g}-{args.samples // 1000}k-lr{args.lr:g}-k{args.k}-s{args.seed}"
    path = Path(args.out) / f"probe-{name}.json"
    if path.exists():
        print(f"{path}: done, skipped")
        return
    started = time.perf_counter()
    train = load_dataset("cifar10", "train")
    keep = torch.tensor(validation_indices(train.labels))
    val = ImageSet(train.images[keep].contiguous(), train.labels[keep].clone(), train.classes, "val", dataset="cifar10")
    fewshot = make_manifest("cifar10", "train", args.k, args.seed, 0).materialize()
    teacher = load_teacher("resnet56-cifar10", None, 10, None)
    norm = normalizer(teacher.mean, teacher.std)
    t_model = teacher.model.eval().to(memory_format=torch.channels_last)
    for p in t_model.parameters():
        p.requires_grad_(False)
    plan = plan_depth(t_model, build_model("resnet20"), "even")

    model = build_model("resnet56")
    model.load_state_dict(t_model.state_dict())
    model = model.to(memory_format=torch.channels_last)
    dropped = {path_: [i for i in range(plan.lengths[path_]) if i not in chosen]
               for path_, chosen in plan.selections.items()}
    blend = {"a": 1.0}

    def fade_hook(module, inputs, output):
        return blend["a"] * output + (1.0 - blend["a"]) * inputs[0]

    hooks = [model.get_submodule(p)[i].register_forward_hook(fade_hook) for p, idx in dropped.items() for i in idx]

    def cut() -> None:
        """The dropped units out of the model, in place: kept units keep their parameter objects."""
        for h in hooks:
            h.remove()
        for p, chosen in plan.selections.items():
            parent_path, _, attr = p.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            seq = model.get_submodule(p)
            setattr(parent, attr, torch.nn.Sequential(*[seq[i] for i in chosen]))

    batch, steps = 64, math.ceil(args.samples / 64)
    fade_steps = int(round(args.fade * steps))
    generator = torch.Generator().manual_seed(args.seed)
    augment = resolve_augment("cifar10", None, None)
    batcher = FewShotBatcher(fewshot.images, norm, generator, torch.device("cpu"), augment=augment,
                             mix="mixup+cutmix", alpha=1.0, channels_last=True)
    views = [norm(augment(fewshot.images, generator)).contiguous(memory_format=torch.channels_last)
             for _ in range(8)]
    if fade_steps == 0:  # the control: the usual derived start, BatchNorm re-estimated on the few-shot images
        cut()
        reestimate_batchnorm(model, [norm(fewshot.images).contiguous(memory_format=torch.channels_last)])
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    warm = max(1, int(0.05 * steps))
    model.train()
    losses = []
    for step in range(steps):
        if step == fade_steps and fade_steps > 0:
            cut()
        blend["a"] = max(0.0, 1.0 - (step + 1) / fade_steps) if step < fade_steps else 0.0
        factor = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm)))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * factor
        x = batcher.view(batcher.repeated(batch))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                t = t_model(x)
            s = model(x)
        loss = kd_loss(s.float(), t.float(), 4.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        if step % 200 == 0 or step == steps - 1:
            losses.append((step, float(loss)))
            print(f"step {step}/{steps} a={blend['a']:.3f} loss {float(loss):.4f}", flush=True)
    reestimate_batchnorm(model, views)
    student = build_model("resnet20")
    student.load_state_dict(model.state_dict(), strict=True)
    val_acc = evaluate_model(student.eval(), val.images, val.labels, norm, torch.device("cpu"))
    record = {"probe": "fade", "command": "python benchmarks/derived/fade_probe.py " + " ".join(
                  f"--{k} {v}" for k, v in vars(args).items()),
              "commit": git_commit(), "device": device_description(torch.device("cpu")),
              "threads": torch.get_num_threads(), "seed": args.seed, "k": args.k, "samples": args.samples,
              "fade": args.fade, "fade_steps": fade_steps, "steps": steps, "lr": args.lr,
              "precision": "bf16 autocast, channels_last", "evaluated_on": "validation (1,000 training images, never test)",
              "val_acc": val_acc, "losses": losses, "wall_seconds": time.perf_counter() - started}
    atomic_write_json(path, record)
    print(f"{name}: val {val_acc:.2f}, {record['wall_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
