"""Pack what the device script needs into one folder that a device call can carry (at most 64 MiB).

    GRAFTKD_DATA=../shared/data GRAFTKD_TEACHERS=../shared/teachers \\
      python benchmarks/device/pack.py --teachers resnet56-cifar10 --shots 1,10 --seeds 0,1,2 --out device-payload

Writes (``device-payload/`` is git-ignored; pass it to the device call's ``carry``):

* ``data.pt``: an image pack (``graftkd.data.pack``) with the CIFAR-10 *test* split as a uint8 tensor and a
  ``fewshot`` split holding only the training images the listed draws use (their source indices recorded);
* ``fewshot/k<K>-s<S>.json``: one manifest per draw, pointing into ``data.pt``; the images are exactly those
  of ``graftkd distill --data cifar10 --k K --seed S`` (checked here, pixel for pixel);
* ``bench/<grid>/manifests/k<K>-subset<S>.json`` with ``--bench-grid CONFIG``: the draws of a ``graftkd bench``
  grid's cells at ``--bench-shots``, in the file names the bench looks for (the device script's ``vgg16_grid``
  part); the images are exactly those of the bench's own draws (checked here, pixel for pixel);
* ``teachers/``: the registered teachers' weight files (``GRAFTKD_TEACHERS`` on the device).

Never the archives: the test split is 31 MB as a tensor, the archive 105 MB. The pack is compressed losslessly
(``graftkd.data.pack``: the test split 23.9 MB), so the 30 MB VGG16-BN teacher travels with it in one call;
``--no-compress`` writes plain tensors.

    python benchmarks/device/pack.py --teachers vgg16bn-cifar10 --shots "" \
      --bench-grid configs/cifar10-vgg16-graft.yaml --bench-shots 5,10 --out device-payload
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

LIMIT = 64 * 2**20


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--teachers", default="resnet56-cifar10", help="comma-separated registry names")
    parser.add_argument("--shots", default="1,10")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="device-payload")
    parser.add_argument("--test-images", type=int, default=None,
                        help="keep only the first N test images (the dry run's small pack); default: all")
    parser.add_argument("--bench-grid", help="a `graftkd bench` grid config whose cells' draws to pack too")
    parser.add_argument("--bench-shots", default="5,10", help="with --bench-grid: the K values to pack")
    parser.add_argument("--no-compress", action="store_true", help="plain uint8 tensors (larger)")
    args = parser.parse_args(argv)

    from graftkd.bench.fewshot import grid_cells, load_grid
    from graftkd.data import load_dataset
    from graftkd.data.fewshot import FewShotManifest, make_manifest
    from graftkd.data.pack import save_pack
    from graftkd.files import atomic_write_json
    from graftkd.models.teacher_registry import find_teacher_file, load_registry

    out = Path(args.out)
    (out / "fewshot").mkdir(parents=True, exist_ok=True)
    shots = [int(k) for k in args.shots.split(",") if k]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    draws = {(k, s): make_manifest(args.data, "train", k, s, 0) for k in shots for s in seeds}
    bench_draws, grid = {}, None
    if args.bench_grid:
        grid = load_grid(args.bench_grid)
        if grid.data != args.data:
            raise SystemExit(f"{args.bench_grid} draws from {grid.data}, not --data {args.data}")
        wanted = {int(k) for k in args.bench_shots.split(",") if k}
        subsets = sorted({(c.shots, c.subset) for c in grid_cells(grid) if c.shots in wanted})
        bench_draws = {key: make_manifest(grid.data, "train", key[0], 0, key[1]) for key in subsets}
    used = sorted({i for m in [*draws.values(), *bench_draws.values()] for i in m.indices})
    train = load_dataset(args.data, "train")
    test = load_dataset(args.data, "test")
    if args.test_images is not None:
        test = test.subset(list(range(min(args.test_images, len(test)))), name=test.name)
    fewshot = train.subset(used, name=f"{train.name}[few-shot draws]")
    fewshot.dataset = train.dataset
    path = save_pack(out / "data.pt", {"test": test, "fewshot": fewshot},
                     meta={"source": args.data, "shots": shots, "seeds": seeds, "written_by": " ".join(sys.argv)},
                     source_indices={"fewshot": used}, compress=not args.no_compress)
    position = {source: i for i, source in enumerate(used)}

    def point_into_pack(manifest, target: Path, source: str) -> None:
        """``manifest``'s draw as a manifest into the pack's few-shot split, checked pixel for pixel."""
        packed = FewShotManifest(source=source, split="fewshot", indices=[position[i] for i in manifest.indices],
                                 paths=None, seed=manifest.seed, k=manifest.k, subset=manifest.subset,
                                 num_classes=manifest.num_classes, source_size=len(used)).validate()
        atomic_write_json(target, packed.to_dict())
        again = FewShotManifest.load(target).materialize()
        if not again.images.equal(manifest.materialize().images):
            raise SystemExit(f"{target}: the packed images differ from the draw's; nothing is wrong with the "
                             "source, so this is a bug in the packer")

    for (k, s), manifest in draws.items():
        point_into_pack(manifest, out / "fewshot" / f"k{k}-s{s}.json", "../data.pt")
    for (k, subset), manifest in bench_draws.items():
        point_into_pack(manifest, out / "bench" / grid.name / "manifests" / f"k{k}-subset{subset}.json",
                        "../../../data.pt")
    registry = load_registry()
    (out / "teachers").mkdir(exist_ok=True)
    for name in [t for t in args.teachers.split(",") if t]:
        source = find_teacher_file(registry.get(name))
        shutil.copyfile(source, out / "teachers" / source.name)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    facts = {"out": str(out), "bytes": size, "test_images": len(test), "fewshot_images": len(used),
             "draws": [f"k{k}-s{s}" for k, s in draws], "teachers": args.teachers.split(","),
             "bench_draws": [f"{grid.name}/k{k}-subset{subset}" for k, subset in bench_draws]}
    print(json.dumps(facts))
    if size > LIMIT:
        print(f"warning: {out} holds {size / 2**20:.1f} MiB, over a device call's 64 MiB with the working tree: "
              "carry fewer teachers per call", file=sys.stderr)
    return facts


if __name__ == "__main__":
    main()
