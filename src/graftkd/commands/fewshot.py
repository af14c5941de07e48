"""`graftkd fewshot`: a few-shot manifest, K images per class with the labels dropped."""
from __future__ import annotations

import argparse
from pathlib import Path


NAME = "fewshot"
HELP = "write a few-shot manifest: K images per class, labels dropped"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="digits, cifar10, cifar100, a .tar.gz or an image folder")
    p.add_argument("--split", default="train", help="which split to draw from (default: train)")
    p.add_argument("--k", type=int, required=True, help="images per class")
    p.add_argument("--subset", type=int, default=0, help="which of several disjoint subsets (0, 1, ...)")
    p.add_argument("--out", required=True, help="manifest JSON path")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw: the same seed and subset give the same images")


def run(args) -> None:
    manifest = build_fewshot(args.data, args.k, args.seed, args.subset, args.split, args.out)
    print(f"wrote {args.out}: {manifest.k} per class x {manifest.num_classes} classes from {manifest.source}")


def build_fewshot(
    source: str, k: int, seed: int, subset: int = 0, split: str = "train", out: str | Path | None = None
):
    """Sample K images per class (labels only stratify) and optionally write the manifest."""
    from graftkd.data.fewshot import make_manifest

    manifest = make_manifest(source, split, k, seed, subset)
    if out is not None:
        manifest.save(out)
    return manifest
