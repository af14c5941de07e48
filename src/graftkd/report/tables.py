"""Turn a bench grid's cell files into the paper's Table 1 (Markdown + JSON), with honest statistics.

The report only *reads* result files: every number in it can be traced back to a cell file, the command
and the commit that wrote it. Statistics are reported per variation (see :data:`VARIATIONS`) because
"seed only" spreads (the reference repo's protocol) are systematically smaller than "seed + few-shot
subset" spreads, and mixing them would overstate how stable a method is.
"""
from __future__ import annotations

import json
import math
import statistics
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from graftkd.files import atomic_write_json, atomic_write_text
from graftkd.errors import GraftkdError
from graftkd.models.profile import format_count
from graftkd.records import record_version

#: Statistics a cell can belong to, in report order: ``noise+subset`` varies the training seed and the
#: few-shot subset together (seed i uses subset i); ``noise`` keeps subset 0 and varies only the seed.
VARIATIONS: tuple[str, ...] = ("noise+subset", "noise")
VARIATION_LABELS: dict[str, str] = {"noise+subset": "seed+subset", "noise": "seed only"}
OK, FAILED, UNSUPPORTED = "ok", "failed", "unsupported"
_SKIP_NAMES = {"grid.json", "results.json"}


# --------------------------------------------------------------------------------------------- loading
def _cells_dir(results_dir: Path) -> Path:
    """Cells live in ``<grid>/cells/``; a bare folder of cell files is accepted too (ad-hoc grids)."""
    return results_dir / "cells" if (results_dir / "cells").is_dir() else results_dir


def collect(results_dir: str | Path) -> list[dict[str, Any]]:
    """Load every cell file of a grid folder, in a deterministic (file name) order.

    Files that are not JSON, or JSON that is not a cell (no ``method``/``shots``), are skipped with a
    warning rather than aborting: a grid still running may hold a half-copied or foreign file, and the
    rest of the table is still worth seeing. Each returned cell gets ``_file`` (its path) for tracing.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise GraftkdError(f"results folder not found: {results_dir} (expected results/<grid>/ written by 'graftkd bench')")
    cells: list[dict[str, Any]] = []
    for path in sorted(_cells_dir(results_dir).glob("*.json")):
        if path.name in _SKIP_NAMES or path.name.startswith("."):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            warnings.warn(f"skipping {path}: not readable JSON ({type(exc).__name__}: {exc})", stacklevel=2)
            continue
        if not isinstance(data, dict) or "method" not in data or "shots" not in data:
            warnings.warn(f"skipping {path}: not a bench cell (no 'method'/'shots' keys)", stacklevel=2)
            continue
        if data.get("kind", "bench-cell") != "bench-cell":
            warnings.warn(f"skipping {path}: kind is {data.get('kind')!r}, not 'bench-cell'", stacklevel=2)
            continue
        record_version(data, path)
        data["_file"] = str(path)
        cells.append(data)
    return cells


def load_grid(results_dir: str | Path) -> dict[str, Any] | None:
    """The grid's own description (``grid.json``) when present; the report works without it."""
    path = Path(results_dir) / "grid.json"
    if not path.is_file():
        return None
    try:
        grid = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warnings.warn(f"ignoring {path}: not readable JSON ({exc})", stacklevel=2)
        return None
    return grid if isinstance(grid, dict) else None


# --------------------------------------------------------------------------------------------- helpers
def _variations(cell: dict[str, Any]) -> list[str]:
    """The statistics a cell belongs to; inferred from seed/subset for cells written without the key."""
    value = cell.get("variation")
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    seed, subset = cell.get("seed"), cell.get("subset", 0)
    inferred = []
    if seed == subset:
        inferred.append("noise+subset")
    if subset == 0:
        inferred.append("noise")
    return inferred


def _accuracy(cell: dict[str, Any]) -> float | None:
    """Student test accuracy (%), the number Table 1 reports; ``None`` when missing or not finite."""
    value = (cell.get("student") or {}).get("test_acc")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _status(cell: dict[str, Any]) -> str:
    status = str(cell.get("status", OK))
    if status == OK and _accuracy(cell) is None:
        return FAILED  # an "ok" cell without a usable accuracy cannot enter the statistics
    return status if status in (OK, FAILED, UNSUPPORTED) else FAILED


def _error(cell: dict[str, Any]) -> str:
    if cell.get("error"):
        return str(cell["error"]).strip().splitlines()[0]
    if str(cell.get("status", OK)) == OK:
        return "no finite student.test_acc in the cell file"
    return f"status {cell.get('status')!r} without an error message"


def _method_names(grid: dict[str, Any] | None) -> list[str]:
    """Method order from grid.json, whose ``methods`` may be names or ``{"name": ...}`` entries."""
    names: list[str] = []
    for entry in (grid or {}).get("methods") or []:
        name = entry.get("name", entry.get("method")) if isinstance(entry, dict) else entry
        if name is not None and str(name) not in names:
            names.append(str(name))
    return names


def order_methods(methods: Iterable[str], grid: dict[str, Any] | None = None) -> list[str]:
    """grid.json order when given, else alphabetical with "graft" (the paper's method) first."""
    present = sorted(set(methods))
    declared = [m for m in _method_names(grid) if m in present]
    rest = sorted((m for m in present if m not in declared), key=lambda m: (m != "graft", m))
    return declared + rest


def _most_common(values: Iterable[Any]) -> Any:
    """The value most cells agree on (ties: first seen), so one odd cell cannot relabel a row."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    counts = Counter(json.dumps(v, sort_keys=True) for v in values)
    best = max(counts.values())
    return next(v for v in values if counts[json.dumps(v, sort_keys=True)] == best)


def _stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """n, mean, sample std (ddof=1; 0.0 for a single run, which the table flags by printing n)."""
    accs = [r["test_acc"] for r in runs]
    walls = [r["wall_seconds"] for r in runs if r.get("wall_seconds") is not None]
    n = len(accs)
    return {
        "n": n,
        "mean": statistics.fmean(accs) if n else None,
        "std": (statistics.stdev(accs) if n > 1 else 0.0) if n else None,
        "min": min(accs) if n else None,
        "max": max(accs) if n else None,
        "wall_seconds_mean": statistics.fmean(walls) if walls else None,
        "runs": runs,
    }


# ------------------------------------------------------------------------------------------- summarize
def summarize(cells: list[dict[str, Any]], grid: dict[str, Any] | None = None) -> dict[str, Any]:
    """Group cells by (method, shots) into per-variation statistics plus failures and provenance.

    Returns a JSON-serialisable dict: ``rows`` (one per method and samples per class, in report order),
    ``teacher``, ``protocol``, ``sources`` (command/commit pairs), ``unsupported`` (method -> reasons)
    and ``failed`` (one entry per failed cell). ``grid`` is the optional grid.json content.
    """
    grid = grid or {}
    methods = order_methods((str(c["method"]) for c in cells), grid)
    shots = sorted({int(c["shots"]) for c in cells})
    rank = {m: i for i, m in enumerate(methods)}
    cells = sorted(cells, key=lambda c: (rank[str(c["method"])], int(c["shots"]), c.get("seed", 0) or 0,
                                         c.get("subset", 0) or 0, c.get("_file", "")))

    rows: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    unsupported: dict[str, list[str]] = {}
    for method in methods:
        for k in shots:
            group = [c for c in cells if str(c["method"]) == method and int(c["shots"]) == k]
            if not group:
                continue
            ok = [c for c in group if _status(c) == OK]
            bad = [c for c in group if _status(c) == FAILED]
            unsup = [c for c in group if _status(c) == UNSUPPORTED]
            variations: dict[str, Any] = {}
            for variation in VARIATIONS + tuple(sorted({v for c in ok for v in _variations(c)} - set(VARIATIONS))):
                runs = [{"seed": c.get("seed"), "subset": c.get("subset"), "test_acc": _accuracy(c),
                         "wall_seconds": c.get("wall_seconds"), "file": Path(c.get("_file", "")).name}
                        for c in ok if variation in _variations(c)]
                variations[variation] = {**_stats(runs),
                                         "failed": sum(variation in _variations(c) for c in bad)}
            walls = [float(c["wall_seconds"]) for c in ok if isinstance(c.get("wall_seconds"), (int, float))]
            student = _most_common({key: (c.get("student") or {}).get(key) for key in ("arch", "params", "flops")}
                                   for c in ok) or _most_common(
                {key: (c.get("student") or {}).get(key) for key in ("arch", "params", "flops")} for c in group)
            for c in bad:
                failed.append({"method": method, "shots": k, "seed": c.get("seed"), "subset": c.get("subset"),
                               "error": _error(c), "file": Path(c.get("_file", "")).name})
            reasons = sorted({_error(c) for c in unsup})
            if reasons:
                unsupported.setdefault(method, [])
                unsupported[method] += [r for r in reasons if r not in unsupported[method]]
            rows.append({
                "method": method,
                "shots": k,
                "student": student,
                "method_options": _most_common(c.get("method_options") for c in group),
                "budget": _most_common(c.get("budget") for c in ok),
                "variations": variations,
                "wall_seconds_mean": statistics.fmean(walls) if walls else None,
                "ok": len(ok),
                "failed": {"n": len(bad), "errors": sorted({_error(c) for c in bad})},
                "unsupported": {"n": len(unsup), "errors": reasons},
            })

    teacher = grid.get("teacher") or _most_common(c.get("teacher") for c in cells)
    coverage = _coverage(cells, grid)
    sources = Counter((str(c.get("command", "?")), str(c.get("commit", "?"))) for c in cells)
    return {
        "grid": grid.get("name") or _most_common(c.get("grid") for c in cells),
        "title": grid.get("title"),
        "protocol": grid.get("protocol") or _most_common(c.get("protocol") for c in cells),
        "teacher": teacher,
        "student_arch": grid.get("student_arch") or _most_common(
            (c.get("student") or {}).get("arch") for c in cells),
        "methods": methods,
        "shots": shots,
        "cells": len(cells),
        "sources": [{"command": cmd, "commit": commit, "cells": n} for (cmd, commit), n in sorted(sources.items())],
        "devices": sorted({str(c["device"]) for c in cells if c.get("device")}),
        "rows": rows,
        "unsupported": unsupported,
        "failed": failed,
        "coverage": coverage,
    }


def _coverage(cells: list[dict[str, Any]], grid: dict[str, Any]) -> dict[str, Any] | None:
    """Which of the grid's planned cells have a result file: a partial grid must say it is partial.

    None when grid.json lists no cells (ad-hoc folders). ``missing`` groups the absent cells by method
    and K, so the report can say exactly what a re-run of ``graftkd bench`` would add.
    """
    planned = grid.get("cells")
    if not isinstance(planned, list) or not planned:
        return None
    present = {Path(str(c.get("_file", ""))).stem for c in cells}
    missing = [str(name) for name in planned if str(name) not in present]
    groups: dict[str, int] = {}
    for name in missing:
        method, _, rest = name.partition("-k")
        label = f"{method} K={rest.split('-')[0]}" + (" curves" if name.endswith("-curves") else "")
        groups[label] = groups.get(label, 0) + 1
    return {"planned": len(planned), "present": len(planned) - len(missing), "missing": missing,
            "missing_by_method_and_k": groups}


# -------------------------------------------------------------------------------------------- markdown
def _acc_cell(row: dict[str, Any], variation: str, with_n: bool = True) -> str:
    stats = row["variations"].get(variation) or {"n": 0}
    if stats["n"] == 0:
        if stats.get("failed"):
            return f"failed ({stats['failed']})"
        if row["ok"] == 0 and row["unsupported"]["n"]:
            return "unsupported"
        return "—"
    text = f"{stats['mean']:.2f} ± {stats['std']:.2f}"
    if with_n:
        extra = f", {stats['failed']} failed" if stats.get("failed") else ""
        text += f" (n={stats['n']}{extra})"
    return text


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def _count(value: Any) -> str:
    return format_count(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _md(text: Any) -> str:
    """Keep user text (commands, error messages) from breaking a Markdown table row."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _pivot(summary: dict[str, Any], variation: str) -> list[str]:
    by_key = {(r["method"], r["shots"]): r for r in summary["rows"]}
    header = "| Method | " + " | ".join(f"K={k}" for k in summary["shots"]) + " |"
    lines = [header, "|---|" + "---|" * len(summary["shots"])]
    for method in summary["methods"]:
        cells = [_acc_cell(by_key[(method, k)], variation, with_n=False) if (method, k) in by_key else "—"
                 for k in summary["shots"]]
        lines.append(f"| {_md(method)} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(summary: dict[str, Any], plots: Iterable[str | Path] = ()) -> str:
    """Table 1 layout: protocol line, provenance line, teacher row, one row per (method, K), pivots."""
    title = summary.get("title") or f"Results: {summary.get('grid') or 'grid'}"
    lines = [f"# {title}", ""]
    protocol = summary.get("protocol") or "not recorded in the cell files"
    lines.append(f"**Protocol:** {_md(protocol)}. Accuracy is the student's test accuracy (%), mean ± sample "
                 "std (ddof=1; 0.00 when n=1) over n runs; *seed+subset* varies the training seed and the "
                 "few-shot subset together, *seed only* keeps subset 0.")
    lines.append("")
    sources = "; ".join(f"`{_md(s['command'])}` @ `{_md(s['commit'])}` ({s['cells']} cells)" for s in summary["sources"])
    lines.append(f"**Cells from:** {sources}.")
    if summary.get("devices"):
        lines += ["", f"**Devices:** {'; '.join(_md(d) for d in summary['devices'])}."]
    coverage = summary.get("coverage")
    if coverage:
        if coverage["missing"]:
            groups = ", ".join(f"{label} ({n})" for label, n in coverage["missing_by_method_and_k"].items())
            lines += ["", f"**Coverage: partial grid,** {coverage['present']} of {coverage['planned']} planned cells "
                          f"have results; missing: {_md(groups)}. Re-running the grid's `graftkd bench` command "
                          "runs exactly these."]
        else:
            lines += ["", f"**Coverage:** all {coverage['planned']} planned cells have results."]
    lines.append("")

    acc_cols = [f"Acc. ({VARIATION_LABELS[v]}) mean ± std (n)" for v in VARIATIONS]
    lines.append("| Method | Samples/class | #Params | #FLOPs | " + " | ".join(acc_cols) + " | time/run |")
    lines.append("|---|---|---|---|" + "---|" * len(acc_cols) + "---|")
    teacher = summary.get("teacher") or {}
    if teacher:
        name = teacher.get("name") or teacher.get("arch") or "teacher"
        acc = teacher.get("test_acc")
        acc_text = f"{acc:.2f}" if isinstance(acc, (int, float)) else "—"
        lines.append(f"| Teacher: {_md(name)} | full | {_count(teacher.get('params'))} | "
                     f"{_count(teacher.get('flops'))} | " + " | ".join([acc_text] * len(acc_cols)) + " | — |")
    for row in summary["rows"]:
        student = row.get("student") or {}
        accs = " | ".join(_acc_cell(row, v) for v in VARIATIONS)
        lines.append(f"| {_md(row['method'])} | {row['shots']} | {_count(student.get('params'))} | "
                     f"{_count(student.get('flops'))} | {accs} | {_seconds(row['wall_seconds_mean'])} |")
    lines.append("")

    for variation in VARIATIONS:
        if any(r["variations"].get(variation, {}).get("n") for r in summary["rows"]):
            lines += [f"### Accuracy by samples per class ({VARIATION_LABELS[variation]}, mean ± std)", ""]
            lines += _pivot(summary, variation)
            lines.append("")

    if summary["unsupported"]:
        lines += ["### Unsupported", ""]
        for method, reasons in summary["unsupported"].items():
            lines.append(f"- **{_md(method)}**: {_md('; '.join(reasons))}")
        lines.append("")
    if summary["failed"]:
        lines += ["### Failed cells", ""]
        for f in summary["failed"]:
            lines.append(f"- {_md(f['method'])} K={f['shots']} seed {f['seed']} subset {f['subset']} "
                         f"(`{_md(f['file'])}`): {_md(f['error'])}")
        lines.append("")

    plots = [Path(p) for p in plots]
    if plots:
        lines += ["### Figures", ""]
        for p in plots:
            lines.append(f"![{p.stem}]({p.name})")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- report
def write_report(results_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write ``results.md``, ``results.json`` and the figures for one grid folder, each atomically.

    Returns ``{"markdown": Path, "json": Path, "plots": [Path, ...], "summary": dict}``. Figures are
    skipped (with a warning) when matplotlib is missing or there is nothing to draw, so a report is
    always produced from whatever cells exist. Raises :class:`GraftkdError` when there are no cells.
    """
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else results_dir
    cells = collect(results_dir)
    if not cells:
        raise GraftkdError(
            f"no bench cell files in {results_dir} (looked for {_cells_dir(results_dir)}/*.json); "
            "run 'graftkd bench' first or point 'graftkd report' at results/<grid>/")
    grid = load_grid(results_dir)
    summary = summarize(cells, grid)

    plots: list[Path] = []
    try:
        from graftkd.report import plots as plotting

        for made in (plotting.plot_accuracy_vs_shots(summary, out_dir / "accuracy_vs_shots.png"),
                     plotting.plot_curves(cells, out_dir / "curves.png")):
            if made is not None:
                plots.append(Path(made))
    except ImportError as exc:
        warnings.warn(f"skipping figures: matplotlib is not available ({exc}); pip install matplotlib", stacklevel=2)

    md_path = atomic_write_text(out_dir / "results.md", render_markdown(summary, plots))
    json_path = atomic_write_json(out_dir / "results.json", {**summary, "plots": [p.name for p in plots]})
    return {"markdown": md_path, "json": json_path, "plots": plots, "summary": summary}
