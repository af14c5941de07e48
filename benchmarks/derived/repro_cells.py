"""Re-run the recorded `graftkd distill` command of committed grid cells and compare the numbers.

    python benchmarks/derived/repro_cells.py results/cifar10-derived/cells/<pair>/<row>/k1-s0.json [...] \\
        --write results/cifar10-derived/repro-check.md

Each command runs again as recorded (with ``--samples`` made explicit where the cell's budget was then the
default), into a temporary run directory, at the thread count the cell records;
test accuracy and the label-free agreement must come out identical (same CPU and thread count).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cells", nargs="+")
    parser.add_argument("--write")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    rows = []
    for path in args.cells:
        cell = json.loads(Path(path).read_text())
        threads = re.search(r"(\d+) threads", cell["device"]).group(1)
        words = shlex.split(cell["command"])
        recipe = (cell.get("derive") or {}).get("recipe") or {}
        if cell.get("refine") and recipe.get("samples") and "--samples" not in words:
            # the budget the cell records, made explicit: the default has changed since some cells were made
            words += ["--samples", str(recipe["samples"])]
        if "--compile" not in words:  # made before the option existed: eagerly (its default is auto now)
            words += ["--compile", "off"]
        out_at = words.index("--out")
        with tempfile.TemporaryDirectory() as tmp:
            words[out_at + 1] = tmp
            env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
            started = time.perf_counter()
            subprocess.run([str(Path(sys.executable).parent / words[0]), *words[1:]], cwd=ROOT, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            again = json.loads((Path(tmp) / "result.json").read_text())
        same = (again["student"]["test_acc"] == cell["student"]["test_acc"]
                and again["label_free"] == cell["label_free"])
        rows.append(f"| `{Path(path).relative_to(ROOT) if Path(path).is_absolute() else path}` | {cell['commit'][:12]} | "
                    f"{cell['student']['test_acc']:.2f} | {again['student']['test_acc']:.2f} | "
                    f"{cell['label_free']['agreement']:.2f} | {again['label_free']['agreement']:.2f} | "
                    f"{'identical' if same else 'DIFFERENT'} | {time.perf_counter() - started:.0f} s |")
        print(rows[-1], flush=True)
    text = "\n".join([
        "# Re-running committed cells", "",
        f"`python benchmarks/derived/repro_cells.py ...` at {commit}, {again['device']}: each cell's recorded "
        "command run again into a temporary directory.", "",
        "| cell | cell commit | test acc. | again | agreement | again | verdict | time |",
        "|---|---|---|---|---|---|---|---|", *rows]) + "\n"
    if args.write:
        Path(args.write).write_text(text)


if __name__ == "__main__":
    main()
