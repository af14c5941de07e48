"""Pack what the device script needs into one folder that a device call can carry (at most 64 MiB).

    GRAFTKD_DATA=../shared/data GRAFTKD_TEACHERS=../shared/teachers \\
      python benchmarks/device/pack.py --teachers resnet56-cifar10 --shots 1,10 --seeds 0,1,2 --out device-payload

Writes (``device-payload/`` is git-ignored; pass it to the device call's ``carry``):

* ``data.pt``: an image pack (``graftkd.data.pack``) with the CIFAR-10 *test* split as a uint8 tensor and a
  ``fewshot`` split holding only the training images the listed draws use (their source indices recorded);
* ``fewshot/k<K>-s<S>.json``: one manifest per draw, pointing into ``data.pt``; the images are exactly those
  of ``graftkd distill --data cifar10 --k K --seed S`` (checked here, pixel for pixel);
* ``teachers/``: the registered teachers' weight files (``GRAFTKD_TEACHERS`` on the device).

Never the archives: the test split is 31 MB as a tensor, the archive 105 MB.
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
    args = parser.parse_args(argv)

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
    used = sorted({i for m in draws.values() for i in m.indices})
    train = load_dataset(args.data, "train")
    test = load_dataset(args.data, "test")
    if args.test_images is not None:
        test = test.subset(list(range(min(args.test_images, len(test)))), name=test.name)
    fewshot = train.subset(used, name=f"{train.name}[few-shot draws]")
    fewshot.dataset = train.dataset
    path = save_pack(out / "data.pt", {"test": test, "fewshot": fewshot},
                     meta={"source": args.data, "shots": shots, "seeds": seeds, "written_by": " ".join(sys.argv)},
                     source_indices={"fewshot": used})
    position = {source: i for i, source in enumerate(used)}
    for (k, s), manifest in draws.items():
        packed = FewShotManifest(source="../data.pt", split="fewshot", indices=[position[i] for i in manifest.indices],
                                 paths=None, seed=s, k=k, subset=0, num_classes=manifest.num_classes,
                                 source_size=len(used)).validate()
        target = out / "fewshot" / f"k{k}-s{s}.json"
        atomic_write_json(target, packed.to_dict())
        again = FewShotManifest.load(target).materialize()
        if not again.images.equal(manifest.materialize().images):
            raise SystemExit(f"{target}: the packed images differ from the draw's; nothing is wrong with the "
                             "source, so this is a bug in the packer")
    registry = load_registry()
    (out / "teachers").mkdir(exist_ok=True)
    for name in [t for t in args.teachers.split(",") if t]:
        source = find_teacher_file(registry.get(name))
        shutil.copyfile(source, out / "teachers" / source.name)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    facts = {"out": str(out), "bytes": size, "test_images": len(test), "fewshot_images": len(used),
             "draws": [f"k{k}-s{s}" for k, s in draws], "teachers": args.teachers.split(",")}
    print(json.dumps(facts))
    if size > LIMIT:
        print(f"warning: {out} holds {size / 2**20:.1f} MiB, over a device call's 64 MiB with the working tree: "
              "carry fewer teachers per call", file=sys.stderr)
    return facts


if __name__ == "__main__":
    main()
