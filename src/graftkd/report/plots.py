"""The paper's figures from bench results: accuracy vs samples per class (Fig. 4), train/test curves (Fig. 3).

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch),
so they render headless and never touch an interactive session's backend. Every PNG is written to a
temporary file beside its target and renamed into place, like all other result files.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable, Sequence

from graftkd.files import atomic_write_bytes
from graftkd.report.tables import VARIATION_LABELS, VARIATIONS, order_methods


def _figure(width: float, height: float) -> Any:
    """A Figure bound to an Agg canvas; import here so the report still works without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Any, path: str | Path) -> Path:
    """Render in memory, then write atomically: readers never see half a PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def plot_accuracy_vs_shots(summary: dict[str, Any], path: str | Path,
                           variation: str = "noise+subset") -> Path | None:
    """Figure 4: student accuracy vs samples per class, one line per method with std error bars.

    Uses ``variation`` statistics, falling back per method to the other variation when a method only
    has those (so a seed-only grid still plots). The teacher's test accuracy is a dashed reference.
    Returns ``None`` (and writes nothing) when no method has a successful cell.
    """
    order = [variation] + [v for v in VARIATIONS if v != variation]
    series: list[tuple[str, str, list[int], list[float], list[float]]] = []
    for method in summary.get("methods", []):
        rows = [r for r in summary.get("rows", []) if r["method"] == method]
        for var in order:
            points = [(r["shots"], r["variations"][var]) for r in rows if (r["variations"].get(var) or {}).get("n")]
            if points:
                series.append((method, var, [k for k, _ in points], [s["mean"] for _, s in points],
                               [s["std"] for _, s in points]))
                break
    if not series:
        return None

    fig = _figure(6.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for method, var, xs, means, stds in series:
        label = method if var == variation else f"{method} ({VARIATION_LABELS.get(var, var)})"
        ax.errorbar(xs, means, yerr=stds, marker="o", markersize=4, capsize=3, linewidth=1.5, label=label)
    teacher = summary.get("teacher") or {}
    if isinstance(teacher.get("test_acc"), (int, float)):
        ax.axhline(teacher["test_acc"], color="black", linestyle="--", linewidth=1,
                   label=f"teacher ({teacher['test_acc']:.2f}%)")
    shots = sorted({k for _, _, xs, _, _ in series for k in xs})
    ax.set_xscale("log")
    ax.set_xticks(shots)
    ax.set_xticklabels([str(k) for k in shots])
    ax.minorticks_off()
    if len(shots) == 1:
        ax.set_xlim(shots[0] / 1.5, shots[0] * 1.5)
    ax.set_xlabel("samples per class (K)")
    ax.set_ylabel("test accuracy (%)")
    title = summary.get("title") or summary.get("grid") or ""
    ax.set_title(f"{title} — mean ± std ({VARIATION_LABELS.get(variation, variation)})".strip(" —"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save_png(fig, path)


def _curve(cell: dict[str, Any]) -> tuple[list[float], dict[str, list[float]], list[float]]:
    """Concatenate a cell's stage eval curves on a cumulative epoch axis; returns (x, metrics, boundaries).

    Stage curves count epochs from the start of their stage; a stage's length is its ``epochs`` (or its
    last evaluated epoch when that key is missing). Boundaries are the cumulative ends of all but the
    last stage.
    """
    xs: list[float] = []
    metrics: dict[str, list[float]] = {"train_acc": [], "test_acc": []}
    boundaries: list[float] = []
    offset = 0.0
    stages = [s for s in cell.get("stages") or [] if isinstance(s, dict)]
    for i, stage in enumerate(stages):
        curve = [p for p in stage.get("eval_curve") or [] if isinstance(p, (list, tuple)) and len(p) == 2]
        for epoch, values in curve:
            xs.append(offset + float(epoch))
            for key in metrics:
                value = values.get(key) if isinstance(values, dict) else None
                metrics[key].append(float(value) if isinstance(value, (int, float)) else float("nan"))
        length = stage.get("epochs")
        if not isinstance(length, (int, float)):
            length = float(curve[-1][0]) if curve else 0.0
        offset += float(length)
        if i < len(stages) - 1:
            boundaries.append(offset)
    return xs, metrics, boundaries


def _has_curve(cell: dict[str, Any]) -> bool:
    return cell.get("status", "ok") == "ok" and any(
        isinstance(s, dict) and s.get("eval_curve") for s in cell.get("stages") or [])


def _pick_cells(cells: Iterable[dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One representative run per method: the largest K that every method has curves for (else the
    largest K with any), and within it the lowest seed/subset, so the comparison is like for like."""
    usable = [c for c in cells if str(c.get("method")) in methods and _has_curve(c)]
    if not usable:
        return {}
    shots_by_method = {m: {int(c["shots"]) for c in usable if str(c["method"]) == m} for m in methods}
    present = [s for s in shots_by_method.values() if s]
    common = set.intersection(*present) if present else set()
    k = max(common) if common else max(int(c["shots"]) for c in usable)
    picked: dict[str, dict[str, Any]] = {}
    for method in methods:
        candidates = sorted((c for c in usable if str(c["method"]) == method and int(c["shots"]) == k),
                            key=lambda c: (c.get("seed") or 0, c.get("subset") or 0, c.get("_file", "")))
        if candidates:
            picked[method] = candidates[0]
    return picked


def plot_curves(cells: list[dict[str, Any]], path: str | Path,
                methods: Sequence[str] = ("graft", "whole")) -> Path | None:
    """Figure 3: train vs test accuracy over epochs, block grafting (stages concatenated) vs ``whole``.

    One panel per method that has evaluation curves; graft's stage boundaries are light vertical lines.
    Returns ``None`` (and writes nothing) when no cell of these methods recorded an ``eval_curve``.
    """
    picked = _pick_cells(cells, list(methods))
    if not picked:
        return None
    names = order_methods(picked, {"methods": list(methods)})
    fig = _figure(5.0 * len(names), 3.8)
    axes = [fig.add_subplot(1, len(names), 1)]  # a shared y axis keeps the methods' gaps comparable
    axes += [fig.add_subplot(1, len(names), i + 1, sharey=axes[0]) for i in range(1, len(names))]
    for ax, method in zip(axes, names):
        cell = picked[method]
        xs, metrics, boundaries = _curve(cell)
        for bound in boundaries:
            ax.axvline(bound, color="grey", alpha=0.3, linewidth=1)
        ax.plot(xs, metrics["train_acc"], label="train (few-shot set)", linewidth=1.5)
        ax.plot(xs, metrics["test_acc"], label="test", linewidth=1.5)
        ax.set_title(f"{method}: K={cell['shots']}, seed {cell.get('seed')}, subset {cell.get('subset')}")
        ax.set_xlabel("epoch (cumulative over stages)" if boundaries else "epoch")
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    return _save_png(fig, path)
