"""Development probe, scored on the fixed labeled *validation* split (never test): do images synthesised from the
teacher's own BatchNorm statistics, started from the few-shot images, help the derived student generalise?

    python benchmarks/derived/synth_probe.py --n 1000 --iters 100 --k 10 --seed 0

Why: the derived student agrees with its teacher on 93-96 % of the few-shot images' views but scores 75-84 % on
validation; the few images limit it, not the start (NOTES.md). The teacher's BatchNorm running statistics
summarise the 50,000 images it was trained on. DeepInversion (Yin et al., CVPR 2020) optimises input batches so
that every BatchNorm layer's batch mean and variance match those running statistics; here each batch starts
from mixed, cropped and flipped few-shot images instead of noise, so fewer steps are needed. The loss is
DeepInversion's: cross-entropy to a random target class (``--ce``), the BatchNorm term (``--bn``), a smoothness
prior (``--tv``). The synthetic images are quantised to uint8 and added to the few-shot set; the student is then
derived and refined by the unchanged default path (`graftkd distill`'s workflow, ``--samples`` budget), which
sees them as more unlabeled images. ``--n 0`` is the control.

One JSON file per run under --out (command, commit, device, threads, wall time, the synthesis's own time).
The library's version of the synthesis is `graftkd.engine.inversion` (the same loss and schedule; its draws come
from one generator, so its images differ from these); this copy stays because it made the committed probe numbers.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def synthesise(model: nn.Module, norm: nn.Module, images: torch.Tensor, n: int, *, iters: int, batch: int, lr: float,
               bn_weight: float, ce_weight: float, tv_weight: float, generator: torch.Generator, num_classes: int,
               log_every: int = 25) -> tuple[torch.Tensor, list]:
    """``n`` uint8 images: mixed views of ``images`` optimised so that ``model``'s BatchNorm batch statistics
    match its running statistics (DeepInversion's loss, started from data)."""
    from graftkd.data.augment import random_crop_flip

    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    terms: list[torch.Tensor] = []

    def hook(module, inputs, output):
        x = inputs[0].float()
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        terms.append(torch.linalg.vector_norm(mean - module.running_mean)
                     + torch.linalg.vector_norm(var - module.running_var))

    handles = [m.register_forward_hook(hook) for m in layers]
    mean = norm.mean.view(1, -1, 1, 1)
    std = norm.std.view(1, -1, 1, 1)
    out, log = [], []
    try:
        for start in range(0, n, batch):
            b = min(batch, n - start)
            first = torch.randint(len(images), (b,), generator=generator)
            second = torch.randint(len(images), (b,), generator=generator)
            lam = torch.distributions.Beta(1.0, 1.0).sample((b, 1, 1, 1))
            x0 = lam * random_crop_flip(images[first], generator=generator).float() \
                + (1 - lam) * random_crop_flip(images[second], generator=generator).float()
            x = ((x0 / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last).requires_grad_(True)
            targets = torch.randint(num_classes, (b,), generator=generator)
            optimizer = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9))
            for step in range(iters):
                lr_now = lr * 0.5 * (1 + math.cos(math.pi * step / iters))
                for group in optimizer.param_groups:
                    group["lr"] = lr_now
                terms.clear()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(x)
                bn = torch.stack(terms).sum()
                ce = F.cross_entropy(logits.float(), targets)
                tv = ((x[:, :, 1:, :] - x[:, :, :-1, :]) ** 2).mean() + ((x[:, :, :, 1:] - x[:, :, :, :-1]) ** 2).mean()
                loss = bn_weight * bn + ce_weight * ce + tv_weight * tv
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():  # stay inside the image range
                    x.copy_(torch.maximum(torch.minimum(x, (1 - mean) / std), -mean / std))
                if step % log_every == 0 or step == iters - 1:
                    log.append({"batch_start": start, "step": step, "bn": float(bn), "ce": float(ce), "tv": float(tv)})
                    print(f"synth {start}+{b}: step {step}/{iters} bn {float(bn):.3f} ce {float(ce):.3f} "
                          f"tv {float(tv):.4f}", flush=True)
            with torch.no_grad():
                pixels = ((x.detach() * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
            out.append(pixels.contiguous())
    finally:
        for h in handles:
            h.remove()
    return torch.cat(out), log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="synthetic images (0: the control)")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--bn", type=float, default=1.0)
    parser.add_argument("--ce", type=float, default=1.0)
    parser.add_argument("--tv", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=128_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/cifar10-derived/dev-amx")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(10_000 + args.seed)  # the mixing weights of the starting views

    from graftkd.commands.distill import distill
    from graftkd.data import load_dataset
    from graftkd.data.dataset import ImageSet
    from graftkd.data.fewshot import make_manifest, validation_indices
    from graftkd.engine.recipe import Recipe
    from graftkd.engine.runtime import device_description, git_commit
    from graftkd.files import atomic_write_json
    from graftkd.graft import GraftConfig
    from graftkd.loaded import load_teacher, normalizer
    from graftkd.refine import DeriveOptions

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dev import validation_set

    name = (f"synth-n{args.n}-it{args.iters}-lr{args.lr:g}-bn{args.bn:g}-ce{args.ce:g}-tv{args.tv:g}"
            f"-{args.samples // 1000}k-k{args.k}-s{args.seed}")
    path = Path(args.out) / f"probe-{name}.json"
    if path.exists():
        print(f"{path}: done, skipped")
        return
    started = time.perf_counter()
    train = load_dataset("cifar10", "train")
    keep = torch.tensor(validation_indices(train.labels))
    val = validation_set(train)
    manifest = make_manifest("cifar10", "train", args.k, args.seed, 0)
    if set(manifest.indices or ()) & set(keep.tolist()):
        raise SystemExit("the few-shot subset overlaps the validation split")
    fewshot = manifest.materialize()
    teacher = load_teacher("resnet56-cifar10", None, 10, None)
    norm = normalizer(teacher.mean, teacher.std)
    synth_seconds, log = 0.0, []
    if args.n:
        generator = torch.Generator().manual_seed(10_000 + args.seed)
        t0 = time.perf_counter()
        synth, log = synthesise(teacher.model.to(memory_format=torch.channels_last), norm, fewshot.images, args.n,
                                iters=args.iters, batch=args.batch, lr=args.lr, bn_weight=args.bn, ce_weight=args.ce,
                                tv_weight=args.tv, generator=generator, num_classes=10)
        synth_seconds = time.perf_counter() - t0
        fewshot = ImageSet(torch.cat([fewshot.images, synth]).contiguous(), None, fewshot.classes,
                           fewshot.name + f"+synth{args.n}", dataset=fewshot.dataset)
        torch.save(synth, Path("/tmp") / f"{name}.pt")
        teacher = load_teacher("resnet56-cifar10", None, 10, None)  # a clean copy (requires_grad, no hooks)
    options = DeriveOptions(fade=0.25, depth_rule="greedy", loss_options={"temperature": 16.0},
                            recipe=replace(Recipe(), samples=args.samples))
    payload = distill(teacher=teacher, student_arch="resnet20", fewshot=fewshot, test=val,
                      config=GraftConfig(shots=args.k, seed=args.seed, precision="auto"), device="cpu",
                      out=None, progress=False, manifest=manifest.to_dict(), derive=options)
    record = {"probe": "synth", "command": "python benchmarks/derived/synth_probe.py " + " ".join(
                  f"--{k} {v}" for k, v in vars(args).items()),
              "commit": git_commit(), "device": device_description(torch.device("cpu")),
              "threads": torch.get_num_threads(), "seed": args.seed, "k": args.k,
              "evaluated_on": "validation (1,000 training images, never test)",
              "val_acc": payload["student"]["test_acc"], "label_free": payload["label_free"],
              "synth_seconds": synth_seconds, "synth_log": log, "wall_seconds": time.perf_counter() - started}
    atomic_write_json(path, record)
    print(f"{name}: val {record['val_acc']:.2f}, synthesis {synth_seconds:.0f} s, {record['wall_seconds']:.0f} s",
          flush=True)


if __name__ == "__main__":
    main()
