"""The experiment grid: methods × shots × seeds × few-shot subsets, one result file per cell, resumable.

A grid is a YAML file (see ``configs/``). Every cell gets the same teacher, the same few-shot manifest
for its (K, subset), the same augmentation, the same fresh student (seeded) and the same epoch budget
(grafting's total), so methods differ only in what they do with them. A finished cell's file is never
recomputed; a killed grid re-run with the same command finishes only the missing cells, and a cell
killed half-way resumes from its checkpoint under the runs directory.

Seeds vary training noise AND the few-shot subset (``variation: both`` runs seed i on subset i, and
also seed i on subset 0 — the reference repo's protocol, training noise only); reports give both.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from graftkd.bench.cells import finished, read_yaml
from graftkd.files import atomic_write_json
from graftkd.engine.runtime import resolve_device, run_facts, seed_everything
from graftkd.errors import GraftkdError, Interrupted

PROTOCOL = ("last-epoch student after the full budget; nothing is selected on the test split, which is used "
            "only for reporting; labels of the few-shot images are never used for training")


@dataclass
class CurveSpec:
    """Figure 3: per-epoch train (few-shot images) and test accuracy for a few methods at one K."""

    methods: list[str] = field(default_factory=lambda: ["graft", "whole"])
    shots: int = 5
    seed: int = 0
    eval_every: int = 10


@dataclass
class TeacherSpec:
    """Exactly one of: a registry name, a weights file (+ arch unless it says), or a recipe to train one."""

    registry: str | None = None
    file: str | None = None
    arch: str | None = None
    teachers_dir: str | None = None
    train: dict[str, Any] | None = None  # arch + TeacherRecipe fields


@dataclass
class GridConfig:
    name: str
    data: str  # labeled source: few-shot images come from its train split, reporting uses its test split
    teacher: dict[str, Any]  # TeacherSpec as a mapping: {registry: NAME} | {file: PATH, arch: ARCH} | {train: {...}}
    student: str
    methods: dict[str, dict[str, Any] | None]  # method name -> options (order kept)
    shots: list[int]
    seeds: list[int]
    title: str = ""
    preset: str = "cifar10"
    variation: Literal["both", "noise+subset", "noise"] = "both"
    augment: bool = True
    padding: int | None = None
    flip: bool | None = None
    mixup: bool = False
    inherit: str | list[int] = "auto"
    block_epochs: int | list[int] | None = None
    net_epochs: int | list[int] | None = None
    block_lr: float | list[float] | None = None
    net_lr: float | list[float] | None = None
    block_adapter_lr_scale: float | None = None  # adapters' rate / block rate in block stages (preset default)
    net_lr_batch_scaled: bool | None = None  # network-stage rates scaled by B/64 (preset default)
    baseline_lr: float | None = None  # Adam lr at batch 64 for end-to-end methods; default: preset block lr
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    curves: dict[str, Any] | None = None  # CurveSpec as a mapping
    # CPU threads for the whole grid (teacher included). CPU results depend on the thread count bit for bit
    # (reductions split differently), so a grid meant to be re-run and compared pins it; None: torch's default.
    threads: int | None = None
    # save each finished cell's student as <runs>/<grid>/cells/<cell>/student.pt (the format `distill`
    # writes, so `export` and `evaluate --weights` take it); off by default: a grid has hundreds of cells
    keep_students: bool = False

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> "GridConfig":
        """Keys and types checked against the annotations above (graftkd.schema), then the semantics."""
        from graftkd.schema import from_mapping

        config = from_mapping(cls, raw, where)
        config.validate(where)
        return config

    def validate(self, where: str) -> None:
        from graftkd.engine.supervised import TeacherRecipe
        from graftkd.graft.schedule import PRESETS
        from graftkd.schema import from_mapping

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise GraftkdError(f"{where}: {message}")

        need(self.name.replace("-", "").replace("_", "").isalnum() and self.name.isascii(),
             f"name must be letters, digits, '-' or '_' (it names the results folder), got {self.name!r}")
        need(len(self.methods) > 0, "methods must map method names to options")
        bad = [m for m in self.methods if not (m.replace("_", "").isalnum() and m.isascii())]
        need(not bad, f"method rows {', '.join(map(repr, bad))} must be letters, digits or '_' (they name result "
                      "files); give another method's options under a new name with method: NAME")
        need(bool(self.shots) and all(k > 0 for k in self.shots),
             f"shots must be a list of positive integers, got {self.shots!r}")
        need(len(set(self.shots)) == len(self.shots), f"shots has repeated values: {self.shots!r}")
        need(bool(self.seeds) and all(s >= 0 for s in self.seeds),
             f"seeds must be a non-empty list of integers >= 0, got {self.seeds!r}")
        need(len(set(self.seeds)) == len(self.seeds), f"seeds has repeated values: {self.seeds!r}")
        need(self.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        need(self.padding is None or self.padding >= 0, f"padding must be >= 0, got {self.padding}")
        need(self.threads is None or self.threads >= 1,
             f"threads must be >= 1 (CPU threads for every cell) or left out for torch's default, got {self.threads!r}")
        for key in ("block_epochs", "net_epochs"):
            value = getattr(self, key)
            values = value if isinstance(value, list) else [value] if value is not None else []
            need(all(v >= 0 for v in values), f"{key} must be >= 0, got {value!r}")
        for key in ("block_lr", "net_lr", "baseline_lr", "block_adapter_lr_scale"):
            value = getattr(self, key)
            values = value if isinstance(value, list) else [value] if value is not None else []
            need(all(v > 0 for v in values), f"{key} must be > 0, got {value!r}")
        teacher = from_mapping(TeacherSpec, self.teacher, where, prefix="teacher.")
        need(sum(v is not None for v in (teacher.registry, teacher.file, teacher.train)) == 1,
             "teacher must have exactly one of: registry: NAME, file: PATH (+ arch), train: {arch: ..., ...}")
        if teacher.train is not None:
            options = dict(teacher.train)
            need(isinstance(options.pop("arch", None), str), "teacher.train needs arch: the zoo model to train")
            from_mapping(TeacherRecipe, options, where, prefix="teacher.train.")
        if self.curves is not None:
            curves = from_mapping(CurveSpec, self.curves, where, prefix="curves.")
            need(curves.shots > 0 and curves.eval_every > 0, "curves.shots and curves.eval_every must be > 0")
            unknown = [m for m in curves.methods if m not in self.methods]
            need(not unknown, f"curves.methods {', '.join(unknown)} not in methods ({', '.join(self.methods)})")


def load_grid(path: str | Path) -> GridConfig:
    path = Path(path)
    return GridConfig.from_dict(read_yaml(path), str(path))


@dataclass(frozen=True)
class Cell:
    method: str
    shots: int
    seed: int
    subset: int
    variations: tuple[str, ...]
    curves: bool = False

    @property
    def key(self) -> str:
        return f"{self.method}-k{self.shots}-seed{self.seed}-subset{self.subset}" + ("-curves" if self.curves else "")


def build_row_method(row: str, options: dict[str, Any] | None):
    """The method of one row of a grid: the registered method named ``row``, or, when the options say
    ``method: NAME``, that method under the row's name (two rows of one method with other options)."""
    from graftkd.distill.base import build_method

    options = dict(options or {})
    name = options.pop("method", row)
    if not isinstance(name, str):
        raise GraftkdError(f"methods.{row}.method must be the name of a registered method, got {name!r}")
    return build_method(name, options)


def grid_cells(config: GridConfig) -> list[Cell]:
    """Every cell of the grid, in run order (cheap K first, so partial grids are still useful)."""
    pairs: dict[tuple[int, int], list[str]] = {}
    for seed in config.seeds:
        if config.variation in ("both", "noise+subset"):
            pairs.setdefault((seed, seed), []).append("noise+subset")
        if config.variation in ("both", "noise"):
            pairs.setdefault((seed, 0), []).append("noise")
    cells = [
        Cell(method, k, seed, subset, tuple(variations))
        for k in sorted(config.shots)
        for (seed, subset), variations in pairs.items()
        for method in config.methods
    ]
    if config.curves is not None:
        spec = CurveSpec(**config.curves)
        cells += [Cell(m, spec.shots, spec.seed, 0, (), curves=True) for m in spec.methods]
    return cells


# ---------------------------------------------------------------------------------------- running
class GridRunner:
    def __init__(self, config: GridConfig, out_root: str | Path = "results", runs_root: str | Path = "runs/bench",
                 device: str = "auto", progress: bool = True, config_path: str = "",
                 cells: list[Cell] | None = None) -> None:
        self.config = config  # the whole grid, as in its file
        self.cells = cells  # the cells to run now (a slice of the grid); None: all of them
        self.out = Path(out_root) / config.name
        self.runs = Path(runs_root) / config.name
        self.device = resolve_device(device)
        self.progress = progress
        self.config_path = config_path
        self._teacher = None
        self._test = None
        self._teacher_facts: dict | None = None

    # ------------------------------------------------------------------ shared inputs (loaded once)
    def teacher(self):
        if self._teacher is None:
            from graftkd.loaded import load_model_file, load_teacher
            from graftkd.commands.train_teacher import train_teacher

            spec = self.config.teacher
            test = self.test()
            if "registry" in spec:
                self._teacher = load_teacher(spec["registry"], None, test.num_classes, spec.get("teachers_dir"))
            elif "file" in spec:
                self._teacher = load_teacher(spec["file"], spec.get("arch"), test.num_classes)
            else:
                from graftkd.engine.supervised import TeacherRecipe

                options = dict(spec["train"])
                arch = options.pop("arch", None)
                if not arch:
                    raise GraftkdError("teacher.train needs arch: the zoo model to train")
                try:
                    recipe = TeacherRecipe(**options)
                except TypeError as exc:
                    raise GraftkdError(f"teacher.train: {exc}") from None
                trained = self.runs / "teacher" / "model.pt"
                if not _trained_with(trained, arch, recipe):  # trained once; later runs and workers reuse it
                    train_teacher(arch, self.config.data, self.runs / "teacher", recipe, str(self.device), self.progress)
                self._teacher = load_model_file(arch, trained, test.num_classes)
            self._teacher.model.to(self.device).eval()
        return self._teacher

    def teacher_facts(self) -> dict:
        """The teacher's name, size and test accuracy (the registry's record when the test data is the one it was
        measured on), computed once per runner."""
        if self._teacher_facts is None:
            from graftkd.models.profile import count_flops, count_params
            from graftkd.loaded import teacher_accuracy, normalizer

            teacher, test = self.teacher(), self.test()
            acc, source = teacher_accuracy(teacher, test, normalizer(teacher.mean, teacher.std), self.device, False)
            self._teacher_facts = {"name": teacher.source, "arch": teacher.arch, "params": count_params(teacher.model),
                                   "flops": count_flops(teacher.model, tuple(test.images.shape[1:])), "test_acc": acc,
                                   "test_acc_from": source}
        return self._teacher_facts

    def test(self):
        if self._test is None:
            from graftkd.data import load_dataset

            self._test = load_dataset(self.config.data, "test")
            if self._test.labels is None:
                raise GraftkdError(f"{self.config.data} has no labeled test split to report on")
        return self._test

    def manifest(self, shots: int, subset: int):
        from graftkd.data.fewshot import FewShotManifest, make_manifest

        path = self.out / "manifests" / f"k{shots}-subset{subset}.json"
        if path.is_file():
            return FewShotManifest.load(path)
        manifest = make_manifest(self.config.data, "train", shots, 0, subset)
        manifest.save(path)
        return manifest

    # --------------------------------------------------------------------------------- the grid
    def run(self) -> dict:
        planned = grid_cells(self.config)
        cells = planned if self.cells is None else self.cells
        todo = [c for c in cells if not self._finished(c)]
        self._write_grid_file(planned, cells)
        bar = tqdm(total=len(cells), initial=len(cells) - len(todo), unit="cell", disable=not self.progress,
                   dynamic_ncols=True, desc=self.config.name)
        counts = {"ok": 0, "unsupported": 0, "failed": 0, "skipped": len(cells) - len(todo)}
        for index, cell in enumerate(todo, 1):
            bar.set_postfix_str(cell.key)
            if not self.progress:  # logs get a line per cell instead of a bar (no silent minutes)
                print(f"[{index}/{len(todo)}] {cell.key}: running", flush=True)
            record = self.run_cell(cell)
            counts[record["status"]] += 1
            bar.update(1)
            if not self.progress:
                acc = (record.get("student") or {}).get("test_acc")
                print(f"[{index}/{len(todo)}] {cell.key}: {record['status']}"
                      + (f", test {acc:.2f}" if acc is not None else "") + f", {record['wall_seconds']:.0f} s", flush=True)
        bar.close()
        return {"cells": len(cells), **counts, "out": str(self.out)}

    def cell_path(self, cell: Cell) -> Path:
        return self.out / "cells" / f"{cell.key}.json"

    def _finished(self, cell: Cell) -> bool:
        return finished(self.cell_path(cell))

    def _write_grid_file(self, cells: list[Cell], slice_cells: list[Cell]) -> None:
        """grid.json describes the whole grid of the config file, and which slice this invocation ran."""
        payload = {**run_facts(self.device), "kind": "bench-grid", "name": self.config.name,
                   "title": self.config.title or self.config.name, "config_file": self.config_path,
                   "config": {f.name: getattr(self.config, f.name) for f in fields(self.config)},
                   "teacher": self.teacher_facts(), "student_arch": self.config.student, "protocol": PROTOCOL,
                   "methods": list(self.config.methods), "shots": sorted(self.config.shots),
                   "cells": [c.key for c in cells],
                   "last_invocation_cells": [c.key for c in slice_cells]}
        atomic_write_json(self.out / "grid.json", payload)

    def run_cell(self, cell: Cell) -> dict:
        """Run one cell and write its result file (also for failures: status + one-line error)."""
        started = time.perf_counter()
        facts = run_facts(self.device, cell.seed)
        base = {**facts, "kind": "bench-cell", "grid": self.config.name, "method": cell.method,
                "method_options": dict(self.config.methods.get(cell.method) or {}), "shots": cell.shots,
                "subset": cell.subset, "variation": list(cell.variations), "curves": cell.curves,
                "protocol": PROTOCOL, "teacher": self.teacher_facts()}
        try:
            method = build_row_method(cell.method, self.config.methods.get(cell.method))
            record = {**base, **self._run(cell, method), "status": "ok"}
        except Interrupted:
            raise  # Ctrl-C / SIGTERM: not a result; the cell resumes from its checkpoint next time
        except GraftkdError as exc:
            status = "unsupported" if getattr(exc, "unsupported", False) else "failed"
            record = {**base, "status": status, "error": str(exc)}
            tqdm.write(f"{cell.key}: {status}: {exc}")
        record["wall_seconds"] = time.perf_counter() - started
        atomic_write_json(self.cell_path(cell), record)
        return record

    def _run(self, cell: Cell, method) -> dict:
        from graftkd.data import resolve_augment
        from graftkd.distill.base import FewShotTask
        from graftkd.engine.evaluate import accuracy, predict_logits
        from graftkd.graft import ScheduleConfig
        from graftkd.graft.schedule import batch_size_for, paper_budget
        from graftkd.models import build_model
        from graftkd.models.profile import count_flops, count_params
        from graftkd.loaded import normalizer

        config = self.config
        teacher = self.teacher()
        test = self.test()
        manifest = self.manifest(cell.shots, cell.subset)
        labeled = manifest.materialize_with_labels()  # labels: diagnostics (few-shot accuracy) only
        images = labeled.images.to(self.device)
        normalize = normalizer(teacher.mean, teacher.std).to(self.device)
        chosen = resolve_augment(config.data, config.padding, config.flip)
        padding, flip = chosen.padding, chosen.flip
        augment = chosen if config.augment and not chosen.is_identity else None

        generator = seed_everything(cell.seed)
        student = build_model(config.student, num_classes=test.num_classes).to(self.device)
        schedule = ScheduleConfig.from_fields(config)
        batch_size = batch_size_for(cell.shots, len(images))
        epochs, lr = paper_budget(teacher.model, student, tuple(images.shape[1:]), schedule, batch_size,
                                  config.inherit, config.baseline_lr)
        eval_every = CurveSpec(**config.curves).eval_every if (cell.curves and config.curves) else 0

        def eval_hook(forward) -> dict:
            test_logits = predict_logits(forward, test.images, normalize, self.device)
            train_logits = predict_logits(forward, labeled.images, normalize, self.device)
            return {"test_acc": accuracy(test_logits, test.labels), "train_acc": accuracy(train_logits, labeled.labels)}

        task = FewShotTask(
            teacher=teacher.model, student=student, images=images, normalize=normalize, device=self.device,
            generator=generator, batch_size=batch_size, epochs=epochs, lr=lr, shots=cell.shots,
            num_classes=test.num_classes, augment=augment, mixup=config.mixup, precision=config.precision,
            inherit=config.inherit, teacher_arch=teacher.arch, student_arch=config.student,
            run_dir=self.runs / "cells" / cell.key, progress=self.progress, schedule=schedule, seed=cell.seed,
            padding=padding, flip=flip, eval_hook=eval_hook if eval_every else None, eval_every=eval_every,
        )
        outcome = method.run(task)
        model = outcome.student.eval()
        test_acc = accuracy(predict_logits(model, test.images, normalize, self.device), test.labels)
        fewshot_acc = accuracy(predict_logits(model, labeled.images, normalize, self.device), labeled.labels)
        shape = tuple(images.shape[1:])
        arch = config.student if not method.own_student else outcome.extra.get("arch", config.student)
        kept = None
        if config.keep_students:
            from graftkd.loaded import LoadedModel, save_model

            kept = self.runs / "cells" / cell.key / "student.pt"
            save_model(kept, LoadedModel(model, arch, teacher.mean, teacher.std, f"graftkd bench {cell.key}",
                                         teacher.classes or list(test.classes) or None),
                       {"test_acc": test_acc, "teacher": teacher.source, "cell": cell.key})
        return {
            "student": {"arch": arch, "params": count_params(model), "flops": count_flops(model, shape),
                        "test_acc": test_acc, "fewshot_acc": fewshot_acc, "file": str(kept) if kept else None},
            "budget": {"epochs": epochs, "batch_size": batch_size, "lr": lr,
                       "steps": sum(int(s.get("steps", 0)) for s in outcome.stages)},
            "fewshot": {"manifest": str(self.out / "manifests" / f"k{cell.shots}-subset{cell.subset}.json"),
                        "images": len(images)},
            "stages": outcome.stages,
            "method_extra": outcome.extra,
        }


def run_fewshot_grid(config: GridConfig, config_path: str | Path, out_root: str | Path = "results",
                     runs_root: str | Path = "runs/bench", device: str = "auto", progress: bool = True, only: list[str] | None = None,
                     shots: list[int] | None = None, seeds: list[int] | None = None, curves_only: bool = False,
                     jobs: int = 1) -> dict:
    """Run (or finish) every cell of the few-shot grid ``config``, read from ``config_path`` (or a slice of it).

    ``jobs`` > 1 runs that many cells at once, each in its own process with the grid's thread count (or the
    machine's cores split between the jobs when the grid pins none): each cell's numbers are those of a
    sequential run at that thread count."""
    if jobs < 1:
        raise GraftkdError(f"--jobs {jobs}: run at least 1 cell at a time")
    for name, options in config.methods.items():  # unknown methods or options fail now, not in cell 37
        build_row_method(name, options)
    unknown = [m for m in only or [] if m not in config.methods]
    if unknown:
        raise GraftkdError(f"--methods {', '.join(unknown)} not in {config_path} (it has {', '.join(config.methods)})")
    for flag, chosen, available in (("--shots", shots, config.shots), ("--seeds", seeds, config.seeds)):
        unknown = [v for v in chosen or [] if v not in available]
        if unknown:
            raise GraftkdError(f"{flag} {unknown} not in {config_path} (it has {available})")

    def in_slice(cell: Cell) -> bool:
        """A cell (a curve cell too) is in the slice when its method, K and seed are."""
        return ((not only or cell.method in only) and (not shots or cell.shots in shots)
                and (not seeds or cell.seed in seeds) and (cell.curves or not curves_only))

    cells = [c for c in grid_cells(config) if in_slice(c)]
    if curves_only and not cells:
        raise GraftkdError(f"--curves-only: no curve cells to run; {config_path} has no `curves:` key, or "
                           "--methods/--shots/--seeds left out its curve methods, K or seed")
    if jobs > 1:
        return _run_parallel(config, str(config_path), out_root, runs_root, device, cells, jobs)
    with _cpu_threads(config.threads):
        return GridRunner(config, out_root, runs_root, device, progress, str(config_path), cells).run()


def _trained_with(path: Path, arch: str, recipe) -> bool:
    """True when ``path`` is a finished ``train-teacher`` model of ``arch`` made with exactly ``recipe``."""
    if not path.is_file():
        return False
    from graftkd.models.convert import read_checkpoint

    try:
        extras = read_checkpoint(path)[1]
    except GraftkdError:
        return False
    return extras.get("arch") == arch and extras.get("recipe") == recipe.to_dict()


def _run_parallel(config: GridConfig, config_path: str, out_root, runs_root, device: str, cells: list[Cell],
                  jobs: int) -> dict:
    """Cells in ``jobs`` worker processes (spawned: no inherited thread pools); one line per finished cell."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = config.threads or max(1, (os.cpu_count() or 1) // jobs)
    runner = GridRunner(config, out_root, runs_root, device, False, config_path, cells)
    todo = [c for c in cells if not runner._finished(c)]
    runner._write_grid_file(grid_cells(config), cells)
    runner.teacher()  # a teacher trained by the grid is trained once, here, not by every worker
    counts = {"ok": 0, "unsupported": 0, "failed": 0, "skipped": len(cells) - len(todo)}
    print(f"{len(todo)} cells in {jobs} processes, {threads} thread(s) each", flush=True)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        facts = runner.teacher_facts()
        futures = {pool.submit(_cell_worker, config_path, str(out_root), str(runs_root), device, cell, threads, facts):
                   cell for cell in todo}
        for done, future in enumerate(as_completed(futures), 1):
            status, acc, seconds = future.result()
            counts[status] += 1
            print(f"[{done}/{len(todo)}] {futures[future].key}: {status}"
                  + (f", test {acc:.2f}" if acc is not None else "") + f", {seconds:.0f} s", flush=True)
    return {"cells": len(cells), **counts, "out": str(runner.out), "jobs": jobs, "threads_per_job": threads}


def _cell_worker(config_path: str, out_root: str, runs_root: str, device: str, cell: Cell, threads: int,
                 teacher_facts: dict) -> tuple[str, float | None, float]:
    import torch

    torch.set_num_threads(threads)
    runner = GridRunner(load_grid(config_path), out_root, runs_root, device, False, config_path, [cell])
    runner._teacher_facts = teacher_facts  # measured once by the parent
    record = runner.run_cell(cell)
    return record["status"], (record.get("student") or {}).get("test_acc"), float(record["wall_seconds"])


@contextlib.contextmanager
def _cpu_threads(threads: int | None):
    """Pin torch's intra-op CPU threads for the grid, so its cells are bit-identical on any core count."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
