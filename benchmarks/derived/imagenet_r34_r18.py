"""ImageNet: a ResNet-18 derived from a ResNet-34 (torchvision layout and keys), refined on K images per class.

    python benchmarks/derived/imagenet_r34_r18.py --imagenet /data/imagenet --teacher resnet34.pth \\
        --k 10 --out runs/imagenet-r18 [--samples 2000000] [--device cuda]

``--imagenet`` holds ``train/<wnid>/*.JPEG`` (the few-shot set: the first K files per class in sorted order
after a seeded shuffle; labels only stratify) and, optionally, ``val/<wnid>/*.JPEG`` for reporting (every
image, last-epoch student, nothing selected on it). Images are resized (shorter side 256·size/224) and centre-
cropped to ``--size`` (224). ``--teacher`` is a torchvision ``resnet34`` state dict (e.g. the IMAGENET1K_V1
file); the student is derived (units chosen per stage) and refined by patient KD through ``graftkd distill``'s
workflow, so ``result.json`` has the derivation record and the label-free estimate. Meant for a GPU: on a CPU
run it only with tiny ``--samples`` (the test suite does, on random weights and a fake folder).
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from PIL import Image

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SUFFIXES = {".jpeg", ".jpg", ".png", ".webp"}


def read_split(root: Path, k: int | None, size: int, seed: int):
    """uint8 (N, 3, size, size) images, labels and class names of ``root/<class>/*``; K per class if given."""
    from graftkd.data.dataset import ImageSet

    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise SystemExit(f"{root} has no class folders: expected {root}/<class>/<image>")
    rng = random.Random(seed)
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in SUFFIXES)
        if k is not None:
            rng.shuffle(files)
            if len(files) < k:
                raise SystemExit(f"class {name} has {len(files)} images, fewer than K={k}")
            files = files[:k]
        for path in files:
            with Image.open(path) as im:
                im = im.convert("RGB")
                short = round(256 * size / 224)
                w, h = im.size
                scale = short / min(w, h)
                im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
                pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
            images.append(pixels.permute(2, 0, 1).clone())
            labels.append(label)
    return ImageSet(torch.stack(images).contiguous(), torch.tensor(labels), classes, str(root))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--imagenet", required=True)
    parser.add_argument("--teacher", required=True, help="torchvision resnet34 state dict")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=2_000_000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from graftkd.engine.recipe import Recipe
    from graftkd.graft import GraftConfig
    from graftkd.refine import DeriveOptions
    from graftkd.loaded import LoadedModel
    from graftkd.commands.distill import distill, summary_table
    from graftkd.models.teachers import load_pretrained

    root = Path(args.imagenet)
    fewshot = read_split(root / "train", args.k, args.size, args.seed)
    test = read_split(root / "val", None, args.size, args.seed) if (root / "val").is_dir() else None
    model, _ = load_pretrained("resnet34", args.teacher, num_classes=len(fewshot.classes))
    teacher = LoadedModel(model, "resnet34", MEAN, STD, args.teacher, fewshot.classes)
    config = GraftConfig(shots=args.k, seed=args.seed, precision=args.precision, padding=max(1, args.size // 8))
    payload = distill(teacher=teacher, student_arch="resnet18", fewshot=fewshot, test=test, config=config,
                      device=args.device, out=args.out, progress=True,
                      derive=DeriveOptions(init="derived", recipe=Recipe(samples=args.samples)))
    print(summary_table(payload))
    return payload


if __name__ == "__main__":
    main()
