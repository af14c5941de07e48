"""The full-data grid (``kind: fulldata``): pairs x distillers x modes (standard / SAKD / anti) x seeds.

One result file per cell under ``results/<name>/cells/``, finished cells skipped, unfinished ones resumed
from ``runs/bench/<name>/cells/<key>``; ``graftkd report`` turns the files into the SAKD table
and the policy plot (:mod:`graftkd.report.fulldata`). ``epochs`` / ``limit_train`` shorten
the protocol for CPU runs; the report then says so in its protocol line.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from graftkd.bench.cells import finished
from graftkd.files import atomic_write_json
from graftkd.engine.runtime import resolve_device, run_facts
from graftkd.errors import GraftkdError, Interrupted
from graftkd.report.fulldata import GRID_KIND

MODES = {"standard": "none", "sakd": "sakd", "anti": "anti"}


@dataclass
class PairSpec:
    teacher: dict[str, Any]  # {registry: NAME} | {file: PATH, arch: ARCH}
    student: str
    homo: bool | None = None


@dataclass
class FullGridConfig:
    kind: Literal["fulldata"]  # the runner table in graftkd.bench picks this module by it
    name: str
    data: str
    pairs: list[dict[str, Any]]
    distillers: list[str]  # zoo names; "kd" = logit KD only (no feature distiller)
    modes: list[Literal["standard", "sakd", "anti"]]
    seeds: list[int] = field(default_factory=lambda: [0])
    title: str = ""
    epochs: int = 240
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    batch_size: int = 64
    lr: float | None = None
    limit_train: int | None = None
    eval_every: int = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    full_command: str = ""  # the command of the full-protocol run, stated when this config is a shortened one

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> "FullGridConfig":
        from graftkd.distill.zoo import distiller_class
        from graftkd.schema import from_mapping

        config = from_mapping(cls, raw, where)
        if not (config.name.replace("-", "").replace("_", "").isalnum() and config.name.isascii()):
            raise GraftkdError(f"{where}: name must be letters, digits, '-' or '_', got {config.name!r}")
        for i, pair in enumerate(config.pairs):
            spec = from_mapping(PairSpec, pair, where, prefix=f"pairs[{i}].")
            if sum(k in spec.teacher for k in ("registry", "file")) != 1:
                raise GraftkdError(f"{where}: pairs[{i}].teacher needs exactly one of registry: NAME or file: PATH")
        for name in config.distillers:
            if name != "kd":
                try:
                    distiller_class(name)
                except GraftkdError as exc:
                    raise GraftkdError(f"{where}: {exc}, or kd (logit KD only)") from None
        if not config.distillers or not config.modes or not config.pairs or not config.seeds:
            raise GraftkdError(f"{where}: pairs, distillers, modes and seeds must be non-empty")
        if config.epochs < 1 or config.batch_size < 1:
            raise GraftkdError(f"{where}: epochs and batch_size must be >= 1")
        return config


def _teacher_arch(pair: dict) -> str:
    if "arch" in pair["teacher"]:
        return pair["teacher"]["arch"]
    from graftkd.models.teacher_registry import load_registry

    return load_registry().get(pair["teacher"]["registry"]).arch


def cell_key(pair: dict, distiller: str, mode: str, seed: int) -> str:
    return f"{_teacher_arch(pair)}-{pair['student']}-{distiller}-{mode}-seed{seed}"


def run_full_grid(config: FullGridConfig, config_path: str, out_root: str | Path = "results",
                  runs_root: str | Path = "runs/bench", device: str = "auto", progress: bool = True) -> dict:
    from graftkd.data import load_dataset
    from graftkd.distill.fulldata import KDRecipe, train_kd
    from graftkd.models import build_model
    from graftkd.models.profile import count_flops, count_params
    from graftkd.loaded import load_teacher, normalizer

    import torch

    device_ = resolve_device(device)
    out, runs = Path(out_root) / config.name, Path(runs_root) / config.name
    train, test = load_dataset(config.data, "train"), load_dataset(config.data, "test")
    images, labels = train.images, train.labels
    if config.limit_train:
        from graftkd.distill.fulldata import training_subset

        keep = training_subset(labels, config.limit_train)
        images, labels = images[keep], labels[keep]
    cells = [(p, d, m, s) for p in config.pairs for d in config.distillers for m in config.modes for s in config.seeds]
    atomic_write_json(out / "grid.json", {**run_facts(device_), "kind": GRID_KIND, "config_file": config_path,
                                          "config": asdict(config), "cells": [cell_key(*c) for c in cells]})
    teachers: dict[str, Any] = {}
    counts = {"ok": 0, "skipped": 0, "failed": 0, "unsupported": 0}
    bar = tqdm(total=len(cells), unit="cell", disable=not progress, desc=config.name)
    for pair, distiller, mode, seed in cells:
        key = cell_key(pair, distiller, mode, seed)
        path = out / "cells" / f"{key}.json"
        if finished(path):
            counts["skipped"] += 1
            bar.update(1)
            continue
        bar.set_postfix_str(key)
        spec = pair["teacher"]
        tkey = json.dumps(spec, sort_keys=True)
        if tkey not in teachers:
            loaded = load_teacher(spec.get("registry") or spec["file"], spec.get("arch"), train.num_classes,
                                  spec.get("teachers_dir"))
            from graftkd.engine.evaluate import evaluate_model

            teachers[tkey] = (loaded, evaluate_model(loaded.model.to(device_), test.images, test.labels,
                                                     normalizer(loaded.mean, loaded.std), device_))
        loaded, teacher_acc = teachers[tkey]
        recipe = KDRecipe(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                          milestones=list(config.milestones), distiller=None if distiller == "kd" else distiller,
                          seed=seed, precision=config.precision, eval_every=config.eval_every,
                          adaptive=MODES[mode], homo=pair.get("homo"))
        torch.manual_seed(seed)
        student = build_model(pair["student"], num_classes=train.num_classes)
        shape = tuple(images.shape[1:])
        base = {**run_facts(device_, seed), "kind": "fulldata-cell", "grid": config.name, "pair": pair,
                "distiller": distiller, "mode": mode, "teacher_arch": loaded.arch, "teacher_acc": teacher_acc,
                "student_arch": pair["student"], "params": count_params(student), "flops": count_flops(student, shape),
                "train_images": len(images), "shortened": bool(config.limit_train) or config.epochs != 240}
        started = time.perf_counter()
        try:
            result = train_kd(student, loaded.model, (images, labels), normalize=normalizer(loaded.mean, loaded.std),
                              recipe=recipe, device=device_, student_arch=pair["student"], teacher_arch=loaded.arch,
                              test=(test.images, test.labels), run_dir=runs / "cells" / key, progress=False)
            record = {**result, **base, "recipe": asdict(recipe), "status": "ok"}  # base names the cell's distiller
            counts["ok"] += 1
        except Interrupted:
            raise  # not a result: the cell resumes from its checkpoint next time
        except GraftkdError as exc:
            record = {**base, "status": "failed", "error": str(exc)}
            counts["failed"] += 1
            tqdm.write(f"{key}: failed: {exc}")
        record["wall_seconds"] = time.perf_counter() - started
        atomic_write_json(path, record)
        bar.update(1)
    bar.close()
    return {"cells": len(cells), **counts, "out": str(out), "kind": "fulldata"}
