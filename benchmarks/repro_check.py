"""Does a fresh run of a grid reproduce the committed table?  Compares two `results.json` files.

Why: the digits table is a claim that anyone can re-derive with `graftkd bench`; this measures how close a
re-run comes, row by row, instead of eyeballing two Markdown tables.

    git clone <repo> /tmp/fresh && cd /tmp/fresh && graftkd bench --config configs/digits.yaml --out /tmp/fresh-results
    python benchmarks/repro_check.py results/digits/results.json /tmp/fresh-results/digits/results.json \\
        --out results/digits/repro-check.json

A row passes when the fresh mean lies within the committed sample std of the committed mean (for n=1
rows, where no std exists, when it is within 0.5 points). Per-run equality is reported too: with the same
seed, subset, code and thread count a cell is expected to reproduce to the last digit, but a different
commit or CPU may move it slightly.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from graftkd.files import atomic_write_json, atomic_write_text  # noqa: E402
from graftkd.engine.runtime import run_facts  # noqa: E402

SINGLE_RUN_TOLERANCE = 0.5  # points; used only where the committed row has n=1 and so no std


def chance_outside_std(n_committed: int, n_fresh: int) -> float:
    """Probability that the mean of ``n_fresh`` runs falls outside the committed mean ± its sample std (of
    ``n_committed`` runs) when both sides are draws of the same normal noise: no difference, only chance.

    Why: at another thread count runs are new draws, so some rows fall outside by chance alone; this says
    how many to expect. (mean_f - mean_c) / (s_c * sqrt(1/n_c + 1/n_f)) is Student-t with n_c - 1 degrees of
    freedom, so the answer is P(|t| > 1 / sqrt(1/n_c + 1/n_f)), integrated here with Simpson's rule.
    """
    if n_committed < 2 or n_fresh < 1:
        raise ValueError(f"need n_committed >= 2 (a std) and n_fresh >= 1, got {n_committed} and {n_fresh}")
    df = n_committed - 1
    bound = 1.0 / math.sqrt(1.0 / n_committed + 1.0 / n_fresh)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(x: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    steps = 2000  # even; the integrand is smooth on [0, bound], so this is exact to ~1e-12
    h = bound / steps
    inner = sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, steps))
    return 1.0 - 2.0 * h / 3.0 * (pdf(0.0) + inner + pdf(bound))


def _rows_by_key(report: dict) -> dict[tuple[str, int, str], dict]:
    out: dict[tuple[str, int, str], dict] = {}
    for row in report.get("rows", []):
        for variation, stats in (row.get("variations") or {}).items():
            if stats and stats.get("n"):
                out[(row["method"], int(row["shots"]), variation)] = stats
    return out


def compare(committed: dict, fresh: dict) -> dict:
    """Row-by-row comparison; rows missing from either side are listed, not silently dropped."""
    old, new = _rows_by_key(committed), _rows_by_key(fresh)
    rows = []
    unique_runs: dict[tuple, bool] = {}  # (method, K, seed, subset) -> identical; a run sits in both variations
    for key in sorted(old.keys() & new.keys()):
        a, b = old[key], new[key]
        tol = a["std"] if a["n"] > 1 else SINGLE_RUN_TOLERANCE
        runs_a = {(r["seed"], r["subset"]): r["test_acc"] for r in a.get("runs", [])}
        runs_b = {(r["seed"], r["subset"]): r["test_acc"] for r in b.get("runs", [])}
        shared = runs_a.keys() & runs_b.keys()
        for k in shared:
            unique_runs[(key[0], key[1], *k)] = runs_a[k] == runs_b[k]
        rows.append({
            "method": key[0], "shots": key[1], "variation": key[2],
            "committed_mean": a["mean"], "committed_std": a["std"], "committed_n": a["n"],
            "fresh_mean": b["mean"], "fresh_std": b["std"], "fresh_n": b["n"],
            "diff": b["mean"] - a["mean"], "tolerance": tol,
            "within": abs(b["mean"] - a["mean"]) <= tol,
            "runs_compared": len(shared),
            "runs_identical": sum(runs_a[k] == runs_b[k] for k in shared),
            "max_run_diff": max((abs(runs_a[k] - runs_b[k]) for k in shared), default=None),
        })
    with_std = [r for r in rows if r["committed_n"] > 1]
    return {
        "rows": rows,
        # rows expected outside the std by chance alone when the runs are new draws (another thread count)
        "expected_outside_by_chance": sum(chance_outside_std(r["committed_n"], r["fresh_n"]) for r in with_std),
        "chance_outside_3_vs_3": chance_outside_std(3, 3),
        "only_committed": [list(k) for k in sorted(old.keys() - new.keys())],
        "only_fresh": [list(k) for k in sorted(new.keys() - old.keys())],
        "rows_within": sum(r["within"] for r in rows),
        "rows_compared": len(rows),
        "runs_identical": sum(unique_runs.values()),
        "runs_compared": len(unique_runs),
        "committed_sources": committed.get("sources"),
        "fresh_sources": fresh.get("sources"),
        "committed_devices": committed.get("devices"),
        "fresh_devices": fresh.get("devices"),
    }


def _sources(result: dict, side: str) -> str:
    commands = ", ".join(s["command"] + " @ " + s["commit"][:7] for s in result[f"{side}_sources"] or [])
    return f"{commands} on {' / '.join(result.get(f'{side}_devices') or ['?'])}"


def to_markdown(result: dict) -> str:
    lines = [
        f"# Reproduction check: {result['rows_within']}/{result['rows_compared']} rows within the committed std",
        "",
        f"Command: `{result['facts']['command']}` @ `{result['facts']['commit']}` on {result['facts']['device']}.",
        f"Committed cells from: {_sources(result, 'committed')}.",
        f"Fresh cells from: {_sources(result, 'fresh')}.",
        "CPU cells are bit-identical only at the same thread count. At another count the runs are new draws: a "
        "row still agrees on average, but under normal noise the mean of 3 runs falls outside the std of 3 "
        f"other runs with probability {100 * result['chance_outside_3_vs_3']:.1f} % (Student t, 2 degrees of "
        "freedom), so there about "
        f"{result['expected_outside_by_chance']:.1f} of these {result['rows_compared']} rows are expected outside "
        "by chance alone (more where a method is deterministic and its std is 0).",
        f"Identical runs (same seed and subset, same accuracy to the last digit): "
        f"{result['runs_identical']}/{result['runs_compared']}.",
        "",
        "| method | K | variation | committed | fresh | diff | within std | runs identical | max run diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        mrd = "—" if r["max_run_diff"] is None else f"{r['max_run_diff']:.2f}"
        lines.append(
            f"| {r['method']} | {r['shots']} | {r['variation']} | {r['committed_mean']:.2f} ± {r['committed_std']:.2f} "
            f"| {r['fresh_mean']:.2f} ± {r['fresh_std']:.2f} | {r['diff']:+.2f} | {'yes' if r['within'] else '**no**'} "
            f"| {r['runs_identical']}/{r['runs_compared']} | {mrd} |")
    for name in ("only_committed", "only_fresh"):
        if result[name]:
            lines += ["", f"Rows in {name.replace('_', ' ')}: " + ", ".join(map(str, result[name]))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("committed", type=Path, help="the committed results.json")
    ap.add_argument("fresh", type=Path, help="results.json written by a fresh `graftkd bench`")
    ap.add_argument("--out", type=Path, required=True, help="comparison JSON; a .md of the same name is written too")
    args = ap.parse_args(argv)
    for path in (args.committed, args.fresh):
        if not path.is_file():
            ap.error(f"{path} does not exist: pass a results.json written by `graftkd report` or `graftkd bench`")
    import torch

    result = compare(json.loads(args.committed.read_text()), json.loads(args.fresh.read_text()))
    result["facts"] = run_facts(torch.device("cpu"))
    atomic_write_json(args.out, result)
    atomic_write_text(args.out.with_suffix(".md"), to_markdown(result))
    print(f"{result['rows_within']}/{result['rows_compared']} rows within the committed std; "
          f"{result['runs_identical']}/{result['runs_compared']} runs identical -> {args.out}")
    return 0 if result["rows_within"] == result["rows_compared"] and not result["only_committed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
