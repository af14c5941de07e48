"""A report on any folder of standalone ``graftkd distill`` runs: one table row per ``result.json`` and
their loss curves in one figure.

    graftkd report runs/          # writes runs/runs.md, runs/runs.json and runs/loss_curves.png
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from graftkd.errors import GraftkdError
from graftkd.records import record_version


def distill_runs(folder: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every ``result.json`` of kind ``distill`` under ``folder`` (sorted by path); unreadable ones skipped."""
    found = []
    for path in sorted(Path(folder).rglob("result.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and result.get("kind") == "distill":
            record_version(result, path)
            found.append((path, result))
    return found


def run_seconds(result: dict[str, Any]) -> tuple[float | None, bool]:
    """What a ``distill`` run cost in all, as ``(seconds, complete)``: this process's wall time, plus the training
    seconds of the processes a resumed run picked up from (``resumed.seconds_before``), plus the making time of
    synthetic images an earlier process of the same run made and this one read from the run folder (images
    read from the shared cache cost this run nothing). ``complete`` is False when an earlier process's time is
    unknown: a checkpoint written before graftkd counted it."""
    wall = result.get("wall_seconds")
    if not isinstance(wall, (int, float)):
        return None, False
    total, complete = float(wall), True
    resumed = result.get("resumed") or {}
    if resumed:
        before = resumed.get("seconds_before")
        if isinstance(before, (int, float)):
            total += float(before)
        else:
            complete = False
    synth = result.get("synth") or {}
    if synth.get("reused") not in (None, "cache") and not synth.get("from_cache"):
        total += float(synth.get("seconds") or 0.0)
    return total, complete


def _stages(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The trained stages, wherever the run's path put them (grafting, derived refinement, a method)."""
    for key in ("graft", "refine"):
        part = result.get(key)
        if isinstance(part, dict) and part.get("stages"):
            return list(part["stages"])
    return []


def _row(folder: Path, path: Path, result: dict[str, Any]) -> dict[str, Any]:
    student, teacher = result.get("student") or {}, result.get("teacher") or {}
    label_free = result.get("label_free") or {}
    return {"run": str(path.parent.relative_to(folder)) or ".", "teacher": teacher.get("source") or teacher.get("arch"),
            "teacher_acc": teacher.get("test_acc"), "student": student.get("arch"), "method": result.get("method"),
            "init": (result.get("init") or {}).get("used"), "shots": (result.get("fewshot") or {}).get("shots"),
            "images": (result.get("fewshot") or {}).get("images"), "test_acc": student.get("test_acc"),
            "agreement": label_free.get("agreement"), "wall_seconds": result.get("wall_seconds"),
            **dict(zip(("seconds_in_all", "seconds_complete"), run_seconds(result))),
            "commit": result.get("commit"), "device": result.get("device")}


def seconds_text(seconds: float | None, complete: bool = True) -> str:
    """``run_seconds``'s answer for a table: "≥" where earlier processes' time is unknown."""
    return "—" if seconds is None else f"{'' if complete else '≥ '}{seconds:.0f} s"


def _num(value: Any, digits: int = 2, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def write_runs_report(folder: str | Path) -> dict[str, Any]:
    """Write ``runs.md``, ``runs.json`` and ``loss_curves.png`` (when matplotlib is there) into ``folder``."""
    folder = Path(folder)
    runs = distill_runs(folder)
    if not runs:
        raise GraftkdError(f"{folder} holds no bench cells and no `graftkd distill` result.json: point "
                           "`graftkd report` at a grid's results folder or a folder of distill runs")
    rows = [_row(folder, path, result) for path, result in runs]
    lines = [f"# distill runs under {folder}", "",
             "One row per `result.json` (test accuracy is the last-epoch student's; the label-free agreement is "
             "what a user without labels can read).", "",
             "| run | teacher | student | method | start | K | test acc. | teacher | agreement | time in all |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['teacher']} | {r['student']} | {r['method']} | {r['init']} | {r['shots']} | "
                     f"{_num(r['test_acc'])} | {_num(r['teacher_acc'])} | {_num(r['agreement'], 1, ' %')} | "
                     f"{seconds_text(r['seconds_in_all'], r['seconds_complete'])} |")
    plot = _plot_losses(folder / "loss_curves.png", [(r["run"], _stages(res)) for r, (_, res) in zip(rows, runs)])
    if plot:
        lines += ["", f"![loss curves]({plot.name})"]
    markdown = folder / "runs.md"
    from graftkd.files import atomic_write_json, atomic_write_text

    atomic_write_text(markdown, "\n".join(lines) + "\n")
    atomic_write_json(folder / "runs.json", {"rows": rows})
    return {"markdown": markdown, "json": folder / "runs.json", "plots": [plot] if plot else []}


def _plot_losses(path: Path, runs: list[tuple[str, list[dict[str, Any]]]]) -> Path | None:
    """Each run's loss per logged epoch, stages laid end to end (log scale)."""
    try:
        from graftkd.report.plots import _figure, _save_png
    except ImportError:
        return None
    curves = []
    for name, stages in runs:
        xs, ys, offset = [], [], 0
        for stage in stages:
            points = stage.get("loss_curve") or []
            xs += [offset + e for e, _ in points]
            ys += [v for _, v in points]
            offset += int(stage.get("epochs") or (points[-1][0] if points else 0))
        if xs:
            curves.append((name, xs, ys))
    if not curves:
        return None
    try:
        fig = _figure(6.5, 4.0)
    except ImportError:
        return None
    ax = fig.add_subplot(1, 1, 1)
    for name, xs, ys in curves:
        ax.plot(xs, ys, label=name, linewidth=1.2)
    ax.set_xlabel("epoch (stages end to end; a chunk of batches for the patient recipe)")
    ax.set_ylabel("training loss")
    if all(v > 0 for _, _, ys in curves for v in ys):
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    return _save_png(fig, path)
