"""Size of an image pack (``graftkd.data.pack``, what a device call carries) plain and compressed, in one run.

    GRAFTKD_DATA=../shared/data python benchmarks/pack_size.py --out benchmarks/results/pack_size-cpu.json

Writes the CIFAR-10 test split as a plain pack and as a compressed one (each row's left-neighbour differences,
deflated), checks that the compressed one reads back the same pixels, and records both sizes and the seconds to
write and read each. A device call carries at most 64 MiB, the working tree included.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from graftkd.data import load_dataset  # noqa: E402
from graftkd.data.pack import load_pack, save_pack  # noqa: E402
from graftkd.engine.runtime import device_description, git_commit  # noqa: E402
from graftkd.files import atomic_write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out")
    args = parser.parse_args()
    started = time.perf_counter()
    images = load_dataset(args.data, args.split)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, compress in (("plain", False), ("compressed", True)):
            path = Path(folder) / f"{name}.pt"
            t = time.perf_counter()
            save_pack(path, {args.split: images}, compress=compress)
            written = time.perf_counter() - t
            t = time.perf_counter()
            again = load_pack(path, args.split)
            read = time.perf_counter() - t
            if not torch.equal(again.images, images.images):
                raise SystemExit(f"the {name} pack read back other pixels")
            rows[name] = {"bytes": path.stat().st_size, "write_seconds": written, "read_seconds": read}
    ratio = rows["compressed"]["bytes"] / rows["plain"]["bytes"]
    for name, row in rows.items():
        print(f"{name:>10}: {row['bytes'] / 1e6:.2f} MB, written in {row['write_seconds']:.1f} s, "
              f"read in {row['read_seconds']:.2f} s")
    print(f"compressed / plain: {ratio:.3f}, the same pixels")
    if args.out:
        atomic_write_json(Path(args.out), {
            "command": "python benchmarks/pack_size.py " + " ".join(sys.argv[1:]), "commit": git_commit(),
            "device": device_description(torch.device("cpu")), "threads": torch.get_num_threads(),
            "data": f"{args.data}/{args.split}", "images": len(images), "rows": rows, "ratio": ratio,
            "wall_seconds": time.perf_counter() - started})


if __name__ == "__main__":
    main()
