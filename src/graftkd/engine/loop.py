"""The few-shot runner every gradient few-shot method goes through (KD, FitNet, "whole", cross, grafting);
the epochs of each stage run in the one training loop, :mod:`graftkd.engine.training`.

Per step: one batch drawn from the few-shot set on the device, augmented in one tensor op; one teacher
forward under ``no_grad`` (its features taken by hooks); one student forward/backward. Loss terms are
summed on the device and read back only at log intervals. Checkpoints are atomic and resumable: a
re-run with the same settings continues where the last one stopped and ends bit-identical on CPU.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from graftkd.engine import compiled
from graftkd.engine.checkpoint import Checkpointer, fingerprint
from graftkd.engine.distributed import _Closure, _wrap, broadcast_object
from graftkd.data.batcher import FewShotBatcher
from graftkd.engine.bn import reestimate_batchnorm
from graftkd.engine.hooks import FeatureTap
from graftkd.engine.recipe import StartAnchor, WeightAverage
from graftkd.engine.runtime import Timer, autocast
from graftkd.engine.signals import StopRequest
from graftkd.engine.training import StageRun, run_stage
from graftkd.data.cache import cache_dir
from graftkd.errors import GraftkdError, Interrupted
from graftkd.files import atomic_write_json, read_json


class MethodInterrupted(Interrupted):
    """Raised after SIGINT/SIGTERM once the state is saved."""


@dataclass
class MethodOutcome:
    """What a few-shot method hands back: the trained student and the records of its stages."""

    student: nn.Module  # the plain student architecture, eval mode
    stages: list[dict] = field(default_factory=list)  # name, epochs, steps, seconds, final_loss, loss_curve, ...
    extra: dict = field(default_factory=dict)  # method-specific facts for result.json


def batcher_for(task) -> FewShotBatcher:
    """The task's images as batches: the patient recipe's crops and mixing when it has one, else the paper's
    crop-and-flip and optional pair mixup."""
    recipe = getattr(task, "recipe", None)
    if recipe is None:
        return FewShotBatcher(task.images, task.normalize, task.generator, task.device, augment=task.augment,
                              pair_mixup=task.mixup)
    return FewShotBatcher(task.images, task.normalize, task.generator, task.device, augment=task.augment,
                          mix=recipe.mix, alpha=recipe.alpha, flip=task.flip, channels_last=task.channels_last,
                          resized_crop=recipe.crop_scale if recipe.crop == "resized" else None,
                          jitter=recipe.jitter, mix_per_sample=recipe.mix_per_sample)


def disagreement_step(student: nn.Module, x: torch.Tensor, teacher_logits: torch.Tensor, size: float,
                      precision: str) -> torch.Tensor:
    """``x`` moved by ``size`` along the sign of the gradient of KL(teacher || student): views where the
    student still disagrees with the teacher (Heo et al. 2019's boundary samples, one step).

    The student's BatchNorm statistics are left as they were: this pass is a probe, not a training view."""
    norms = [m for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [(m.running_mean, m.running_var, m.num_batches_tracked) for m in norms]
    for m in norms:  # batch statistics as in the training pass, without updating the running ones
        m.running_mean = m.running_var = m.num_batches_tracked = None
    try:
        probe = x.detach().requires_grad_(True)
        with autocast(x.device, precision):
            logits = student(probe).float()
        gap = torch.nn.functional.kl_div(torch.log_softmax(logits, 1), torch.log_softmax(teacher_logits, 1),
                                         reduction="sum", log_target=True)
        (grad,) = torch.autograd.grad(gap, probe)
    finally:
        for m, (mean, var, tracked) in zip(norms, saved):
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, tracked
    return (x + size * grad.sign()).detach()


def _unique_parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def run_loss_method(method, task, checkpointer: Checkpointer | None = None, *, empty_ok: bool = False):
    """Run ``method``'s stages on ``task``; return a MethodOutcome with the trained student.

    The loop owns batches, optimiser, schedule, NaN guard, records, progress, checkpoints and resume. A
    method may own, besides its stages and loss: ``batch_input(stage, indices)`` (what its step gets;
    default: the augmented, normalised batch), ``step_terms(stage, batch)`` (its own forward passes),
    ``set_modes(stage)``, ``make_optimizer(stage, params)`` and ``eval_forward(stage)`` (the function an
    evaluation curve scores). ``checkpointer``: the method's own fingerprint (default: one of the method's
    description, the images and the stages). ``empty_ok``: stages without epochs are records, not an error
    (grafting with zero epochs merges the adapters' starting point)."""
    method.setup(task)
    extra = method.extra_modules().to(task.device)
    stages = method.stages(task)
    if not empty_ok and (not stages or all(s.epochs <= 0 for s in stages)):
        raise GraftkdError(f"method '{method.name}' got no epochs to train: raise the budget")
    student, teacher = task.student, task.teacher
    teacher.eval()
    keyed = {"method": method.describe(), "images": list(task.images.shape), "batch": task.batch_size,
             "stages": [(s.name, s.epochs, s.lr) for s in stages], "checksum": int(task.images[:, :, ::7, ::7].sum())}
    recipe = getattr(task, "recipe", None)
    if recipe is not None:  # absent for the paper recipe, so earlier checkpoints keep their fingerprints
        keyed["recipe"] = recipe.to_dict()
        keyed["precision"] = task.precision  # as requested ("auto" resumes with the setting it chose)
        keyed["start"] = float(sum(float(p.detach().double().sum()) for p in student.parameters()))
    if task.compile != "off":  # compiled kernels round differently: a resumed run must compile (or not) alike
        keyed["compile"] = task.compile
    checkpointer = checkpointer or Checkpointer(task.run_dir, fingerprint(keyed), f"method:{method.name}")
    records: list[dict] = []
    start_stage, start_epoch = 0, 0
    state = checkpointer.load()
    if recipe is not None and task.precision == "auto":
        # a resumed run keeps the setting it started with; a new one times the candidates on this machine
        # (under torchrun the first process times them and every process takes its choice)
        task.speed = state["speed"] if state is not None and state.get("speed") else (
            remembered_setting(method, task, stages[0]) if _main(task) else None)
        task.speed = _broadcast(task, task.speed)
        task.precision = task.speed["chosen"]["precision"]
        task.channels_last = task.speed["chosen"]["channels_last"]
    if task.channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    average = WeightAverage(student, recipe.ema) if recipe is not None and recipe.ema > 0 else None
    # the starting point is the student as built: a resumed run rebuilds the same one (the fingerprint's "start")
    anchor = StartAnchor(student, recipe.anchor) if recipe is not None and recipe.anchor > 0 else None
    batcher = batcher_for(task)
    plain = (getattr(method, "step_terms", None) is None and not (recipe is not None and recipe.adversarial > 0)
             and not any(method.teacher_paths(s) or method.student_paths(s) for s in stages)
             and (task.world is None or task.world.size <= 1))
    batch = recipe.batch_size if recipe is not None else task.batch_size
    steps = recipe.steps if recipe is not None else sum(s.epochs for s in stages) * math.ceil(len(task.images) / batch)
    compile_facts = compiled.decide(task.compile, steps, plain_step=plain, device=task.device)
    if compile_facts["used"] and getattr(student, "eager_only", None):  # a student that changes its graph per step
        compile_facts = {"requested": task.compile, "used": False, "why": student.eager_only}
    forwards = compiled.CompiledPair(teacher, student, batch) if compile_facts["used"] else None
    if state is not None:
        student.load_state_dict(state["student"])
        extra.load_state_dict(state["extra"])
        if average is not None:
            average.load_state_dict(state["average"])
        task.generator.set_state(state["generator"])
        start_stage, start_epoch, records = int(state["stage"]), int(state["epoch"]), list(state["records"])
        resumed = resume_note(stages, start_stage, start_epoch, checkpointer.path, checkpointer.seconds_before)
    else:
        resumed = None
    total = sum(s.epochs for s in stages)
    bar = tqdm(total=total, initial=sum(s.epochs for s in stages[:start_stage]) + start_epoch, unit="ep",
               disable=not task.progress, dynamic_ncols=True)
    timer = Timer(task.device)
    try:
        with StopRequest() as stop:
            for index in range(start_stage, len(stages)):
                stage = stages[index]
                resume = state if (state is not None and index == start_stage and start_epoch > 0) else None
                _run_stage(method, task, extra, stages, index, resume, records, checkpointer, bar, stop, forwards,
                           average, batcher, anchor)
                state = None
                if stop.requested and index + 1 < len(stages):
                    raise _interrupted(stop, f"after stage '{stage.name}'", checkpointer)
    finally:
        bar.close()
    if task.channels_last:  # hand back plain tensors (merge, export, evaluation)
        student.to(memory_format=torch.contiguous_format)
        teacher.to(memory_format=torch.contiguous_format)
    if forwards is not None and forwards.failed:
        compile_facts = {**compile_facts, "used": False, "failed": forwards.failed}
    extra_facts = {"seconds": timer.elapsed(), "resumed": resumed, "speed": task.speed, "compile": compile_facts,
                   **getattr(method, "facts", {})}
    if average is not None:  # the averaged weights are the result; their BatchNorm statistics follow
        average.copy_to_module()
        extra_facts["weight_average"] = {"decay": recipe.ema, "updates": average.updates}
    if recipe is not None and recipe.recalibrate_bn:
        extra_facts["bn_recalibrated"] = recalibrate(task, recipe.recalibrate_views)
    student.eval()
    return MethodOutcome(student=student, stages=records, extra=extra_facts)


def _main(task) -> bool:
    return task.world is None or task.world.main


def _broadcast(task, value):
    """Process 0's ``value`` on every process (itself when there is one process)."""
    return value if task.world is None else broadcast_object(task.world, value)


def fastest_setting(method, task, stage, steps: int = 3) -> dict:
    """Time ``steps`` forward/backward passes of ``stage`` (teacher pass, student pass, the method's loss) in
    each candidate setting and return the timings and the fastest: fp32 and, where the hardware runs it
    natively, bf16 autocast; contiguous and channels_last tensors.

    A probe, not training: no optimiser step, the student's state (BatchNorm statistics included) is put
    back, gradients are cleared and the run's generator is not touched, so the run itself is unchanged."""
    index = torch.arange(task.recipe.batch_size, device=task.images.device) % len(task.images)
    base = task.normalize(task.images[index]).float()
    student, teacher = task.student, task.teacher
    was_training = student.training
    student.train(stage.train_student)
    try:
        with FeatureTap(teacher, method.teacher_paths(stage)) as t_tap, FeatureTap(student, method.student_paths(stage)) as s_tap:
            def one_pass(x, precision):
                with torch.no_grad(), autocast(task.device, precision):
                    t_logits = teacher(x).float()
                t_feats = {k: v.detach().float() for k, v in t_tap.features.items()}
                with autocast(task.device, precision):
                    s_logits = student(x)
                return sum(method.loss(stage, s_logits.float(), t_logits, s_tap.features, t_feats).values())

            return time_settings(student, teacher, base, one_pass, task.device, steps, "of the first stage")
    finally:
        student.train(was_training)


def time_settings(student, teacher, x, one_pass, device, steps: int = 3, what: str = "") -> dict:
    """The timings of ``one_pass(x, precision)`` (a loss to back-propagate through ``student``) in every
    candidate setting, and the fastest: fp32 and, where ``device`` runs it natively, bf16 autocast; contiguous
    and channels_last tensors. The student's state (BatchNorm statistics included) is put back and its
    gradients cleared; both models are handed back contiguous."""
    from graftkd.engine.runtime import native_bf16

    precisions = ["fp32", "bf16"] if native_bf16(device) else ["fp32"]
    candidates = [(p, cl) for p in precisions for cl in (False, True)]
    saved = {k: v.clone() for k, v in student.state_dict().items()}
    rows = []
    try:
        for precision, channels_last in candidates:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            student.to(memory_format=fmt)
            if teacher is not None:
                teacher.to(memory_format=fmt)
            batch = x.contiguous(memory_format=fmt)
            seconds = []
            for _ in range(steps + 1):  # the first call picks kernels: not timed
                started = time.perf_counter()
                one_pass(batch, precision).backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds.append(time.perf_counter() - started)
            student.zero_grad(set_to_none=True)
            rows.append({"precision": precision, "channels_last": channels_last,
                         "images_per_second": len(batch) * steps / sum(seconds[1:])})
    finally:
        student.to(memory_format=torch.contiguous_format)
        if teacher is not None:
            teacher.to(memory_format=torch.contiguous_format)
        student.load_state_dict(saved)
        student.zero_grad(set_to_none=True)
    chosen = max(rows, key=lambda r: r["images_per_second"])
    tqdm.write(f"fastest setting here: {_setting_name(chosen)} ({chosen['images_per_second']:.0f} img/s; "
               + ", ".join(f"{r['precision']}/{'cl' if r['channels_last'] else 'contig'} {r['images_per_second']:.0f}"
                           for r in rows) + ")")
    return {"rule": f"fastest of {len(rows)} settings over {steps} timed steps" + (f" {what}" if what else ""),
            "candidates": rows, "chosen": {"precision": chosen["precision"], "channels_last": chosen["channels_last"]}}


def _setting_name(chosen: dict) -> str:
    return f"{chosen['precision']}, {'channels_last' if chosen['channels_last'] else 'contiguous'}"


def settings_path():
    """Where the fastest settings timed on this machine are remembered."""
    return cache_dir() / "fastest_settings.json"


def setting_key(method, task, stage) -> str:
    """What the timing depends on: the machine, torch, both networks, the method's stage and the batch."""
    return settings_key(task.device, task.teacher, task.student, task.recipe.batch_size, task.images.shape[1:],
                        method=method.name, stage=stage.name)


def settings_key(device, teacher, student, batch: int, image, **run) -> str:
    """The cache key of a timed setting: the machine, torch, both networks, the batch, the image shape and what
    the run does (``run``: e.g. the method and its stage)."""
    from graftkd.engine.runtime import device_description

    def net(model):
        return f"{type(model).__name__}:{sum(p.numel() for p in model.parameters())}"

    return json.dumps({"device": device_description(device), "torch": torch.__version__, "teacher": net(teacher),
                       "student": net(student), "batch": batch, "image": list(image), **run}, sort_keys=True)


def remembered_setting(method, task, stage) -> dict:
    """The fastest setting for this machine and run, timed once and remembered in the graftkd cache.

    Timings of a few steps are noisy, and the settings round differently: re-timing on every run would let
    two runs of the same command on the same machine train in different settings and end with different
    students. So the first run times the candidates (``fastest_setting``) and stores its choice under
    ``$GRAFTKD_CACHE``; later runs with the same key take it. Deleting the file times again."""
    return remember_setting(setting_key(method, task, stage), lambda: fastest_setting(method, task, stage))


def remember_setting(key: str, measure) -> dict:
    """The setting stored under ``key`` in the graftkd cache, or ``measure()``'s, stored there for next time."""
    path = settings_path()
    table = read_json(path) if path.is_file() else None
    table = table if isinstance(table, dict) else {}
    if isinstance(table.get(key), dict) and isinstance(table[key].get("chosen"), dict):
        speed = dict(table[key], remembered=str(path))
        tqdm.write(f"fastest setting here: {_setting_name(speed['chosen'])} (timed by an earlier run, remembered in "
                   f"{path}; delete it to time again)")
        return speed
    speed = measure()
    table[key] = speed
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, table)
        speed = dict(speed, remembered=str(path))
    except OSError as exc:  # a read-only cache costs reproducibility across runs, not this run
        tqdm.write(f"could not remember the fastest setting in {path} ({exc}); set GRAFTKD_CACHE to a writable folder")
    return speed


def resume_note(stages, stage: int, epoch: int, path, seconds_before: float | None = None) -> dict:
    """Say (above any progress bar) where a re-run picks the run up; the dict goes into result.json, with the
    training seconds the earlier processes spent up to the checkpoint (None for a checkpoint without them)."""
    name = stages[stage].name if stage < len(stages) else "the end"
    spent = f" ({seconds_before:.0f} s of training before it)" if seconds_before is not None else ""
    tqdm.write(f"resuming {name} at epoch {epoch} from {path}{spent}")
    return {"stage": name, "epoch": epoch, "checkpoint": str(path), "seconds_before": seconds_before}


def recalibrate(task, views: int) -> dict:
    """Re-estimate the student's BatchNorm statistics on ``views`` un-mixed augmented passes over the images.

    Its own generator (seeded from the task's seed), so a resumed run recalibrates identically."""
    generator = torch.Generator().manual_seed(int(task.seed) + 7_919)
    batches = []
    for _ in range(views):
        for chunk in torch.arange(len(task.images)).split(max(2, int(task.batch_size))):
            x = task.images[chunk.to(task.images.device)]
            if task.augment is not None:
                x = task.augment(x, generator)
            batches.append(task.normalize(x).float())
    with torch.no_grad():
        norms = reestimate_batchnorm(task.student, batches)
    return {"norms": norms, "views": views, "images": sum(len(b) for b in batches), "mixed": False}


def _interrupted(stop: StopRequest, where: str, checkpointer: Checkpointer) -> MethodInterrupted:
    saved = (f"state saved to {checkpointer.path}: re-run the same command to resume" if checkpointer.path
             else "nothing was saved (no run directory)")
    return MethodInterrupted(f"stopped by {stop.signal_name} {where}; {saved}")


def _run_stage(method, task, extra: nn.ModuleDict, stages, index: int, resume: dict | None, records: list[dict],
               checkpointer: Checkpointer, bar: tqdm, stop: StopRequest,
               forwards: compiled.CompiledPair | None, average: WeightAverage | None,
               batcher: FewShotBatcher, anchor: StartAnchor | None = None) -> None:
    stage = stages[index]
    student, teacher = task.student, task.teacher
    params = _unique_parameters(stage.modules)
    if not params:
        raise GraftkdError(f"stage '{stage.name}' of method '{method.name}' has nothing to train")
    recipe = getattr(task, "recipe", None)
    own_optimizer = getattr(method, "make_optimizer", None)
    if own_optimizer is not None:
        optimizer: torch.optim.Optimizer = own_optimizer(stage, params)
    elif recipe is not None and recipe.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=stage.lr, momentum=recipe.momentum,
                                                           nesterov=recipe.momentum > 0,
                                                           weight_decay=recipe.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=stage.lr, betas=(0.9, 0.999),
                                     weight_decay=recipe.weight_decay if recipe is not None else 0.0)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        record = records[-1]
        first_epoch = int(resume["epoch"])
    else:
        record = {"name": stage.name, "kind": getattr(stage, "kind", "") or method.name, "epochs": stage.epochs, "lr": stage.lr, "steps": 0,
                  "images": 0, "seconds": 0.0, "final_loss": float("nan"), "loss_terms": {}, "loss_curve": [],
                  "eval_curve": []}
        records.append(record)
        first_epoch = 0
    base_seconds = record["seconds"]
    timer = Timer(task.device)
    bar.set_description(f"{method.name}:{stage.name}")

    frozen = list(getattr(method, "frozen", []))

    # a method may own its step (cross distillation: a block's own inputs and targets) and its modules' modes;
    # the loop still owns the batches, the optimiser, the schedule, the NaN guard, the records and resume
    own_step = getattr(method, "step_terms", None)
    own_modes = getattr(method, "set_modes", None)
    own_input = getattr(method, "batch_input", None)
    own_eval = getattr(method, "eval_forward", None)
    if own_step is not None and task.world is not None and task.world.size > 1:
        raise GraftkdError(f"method '{method.name}' steps on its own modules: it runs in one process, not under torchrun")

    def set_modes() -> None:
        if own_modes is not None:
            own_modes(stage)
            return
        student.train(stage.train_student and not (recipe is not None and recipe.freeze_bn))
        for module in frozen:  # inherited teacher blocks keep the teacher's BatchNorm statistics
            module.eval()
        extra.train()

    world = task.world
    sharded = world is not None and world.size > 1
    if sharded:  # only what trains is wrapped: the student and the method's extra modules, never the teacher
        step_module = _wrap(_Closure({"student": student, "extra": extra}), world, task.device,
                            find_unused_parameters=True)
    # the patient recipe gives each stage its share of the sample budget, with its own warm-up and cosine
    budget = images_budget = None
    if recipe is not None:
        images_budget, budget = recipe.stage_budget(sum(s.epochs for s in stages[:index]), stage.epochs,
                                                    sum(s.epochs for s in stages))
    with FeatureTap(teacher, method.teacher_paths(stage)) as t_tap, FeatureTap(student, method.student_paths(stage)) as s_tap:
        def batches(epoch: int, _first: int):
            return _epoch_batches(batcher, task, recipe, record["steps"], budget,
                                  images_budget - record["images"] if images_budget is not None else None)

        def step(indices: torch.Tensor) -> dict[str, torch.Tensor]:
            if recipe is not None:
                for group in optimizer.param_groups:
                    group["lr"] = stage.lr * recipe.lr_factor(record["steps"], budget)
            x = own_input(stage, indices) if own_input is not None else batcher.view(indices)
            if sharded:  # every process drew the same global batch; each trains on its share
                x = x[world.rank::world.size]
                record["process_images"] = record.get("process_images", 0) + len(x)  # this process's share
            if own_step is not None:
                return own_step(stage, x)
            return _default_step(method, stage, task, x, t_tap, s_tap, step_module if sharded else None, forwards)

        def after_step(indices: torch.Tensor) -> None:
            record["steps"] += 1
            record["images"] += len(indices)

        def end_epoch(completed: int, means: dict[str, float] | None) -> None:
            if means is not None:
                mean_loss = sum(means.values())
                record["final_loss"] = mean_loss
                record["loss_terms"] = means
                record["loss_curve"].append((completed, mean_loss))
                seconds = base_seconds + timer.elapsed()
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{record['images'] / max(seconds, 1e-9):.0f}")
            if task.eval_hook is not None and task.eval_every and completed % task.eval_every == 0:
                student.eval()  # evaluation must not update BatchNorm statistics
                record["eval_curve"].append((completed, task.eval_hook(own_eval(stage) if own_eval else student)))
                set_modes()

        def save(completed: int, _step: int, _running: dict) -> None:
            record["seconds"] = base_seconds + timer.elapsed()
            _save(checkpointer, task, extra, index, completed, optimizer, records, average)

        run_stage(StageRun(
            name=f"stage '{stage.name}' of '{method.name}'", epochs=stage.epochs, batches=batches, step=step,
            update=lambda loss: _optimise(loss, optimizer, params, recipe, average, anchor),
            interrupted=lambda where: _interrupted(stop, f"in stage '{stage.name}' {where}", checkpointer),
            last_good=checkpointer.last_good, save=save, set_modes=set_modes, after_step=after_step,
            end_epoch=end_epoch, log_every=task.log_every, save_after="timed",
            checkpoint_every_s=task.checkpoint_every_s if checkpointer.path else math.inf, bar=bar,
            steps_before=record["steps"]), first_epoch=first_epoch, stop=stop)
    record["seconds"] = base_seconds + timer.elapsed()
    record["images_per_second"] = record["images"] / record["seconds"] if record["seconds"] > 0 else float("nan")
    if not task.progress:  # one line per stage in logs (the bar shows the same live)
        tqdm.write(f"{method.name}:{stage.name}: {stage.epochs} epochs, loss {record['final_loss']:.4f}, "
                   f"{record['images_per_second']:.1f} img/s, {record['seconds']:.1f} s")
    _save(checkpointer, task, extra, index + 1, 0, None, records, average)


def _default_step(method, stage, task, x: torch.Tensor, t_tap: FeatureTap, s_tap: FeatureTap, wrapped=None,
                  forwards: compiled.CompiledPair | None = None):
    """The teacher's pass (no gradient; taps its features), then the student's pass and the method's loss terms;
    under DDP the student's part runs through ``wrapped``; ``forwards``: the compiled pair, when compiling."""
    recipe = getattr(task, "recipe", None)
    teacher, student = (forwards.teacher, forwards.student) if forwards is not None else (task.teacher, task.student)
    with torch.no_grad(), autocast(task.device, task.precision):
        teacher_logits = teacher(x).float()
    if recipe is not None and recipe.adversarial > 0:
        x = disagreement_step(task.student, x, teacher_logits, recipe.adversarial, task.precision)
        with torch.no_grad(), autocast(task.device, task.precision):
            teacher_logits = task.teacher(x).float()
    teacher_features = {k: v.detach().float() for k, v in t_tap.features.items()}

    def forward_terms() -> dict[str, torch.Tensor]:
        with autocast(task.device, task.precision):
            student_logits = student(x)
        return method.loss(stage, student_logits.float(), teacher_logits, s_tap.features, teacher_features)

    return wrapped(forward_terms) if wrapped is not None else forward_terms()


def _optimise(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params, recipe,
              average: WeightAverage | None, anchor: StartAnchor | None = None) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if anchor is not None:
        anchor.pull()
    if recipe is not None and recipe.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(params, recipe.clip_grad)
    optimizer.step()
    if average is not None:
        average.update()


def _epoch_batches(batcher: FewShotBatcher, task, recipe, done_steps: int, budget: int | None,
                   images_left: int | None):
    """The paper recipe: one shuffled pass over the images. The patient one: a chunk of fixed-size batches of
    repeated images; the last chunk stops at the stage's share of the sample budget, and its last batch holds
    what is left of it, so the images seen equal the budget."""
    if recipe is None:
        yield from batcher.epoch(task.batch_size)
        return
    for _ in range(min(recipe.steps_per_chunk, budget - done_steps)):
        size = min(recipe.batch_size, images_left)
        images_left -= size
        yield batcher.repeated(size)


def _save(checkpointer: Checkpointer, task, extra: nn.ModuleDict, stage: int, epoch: int,
          optimizer: torch.optim.Optimizer | None, records: list[dict], average: WeightAverage | None) -> None:
    if not _main(task):
        return  # one writer: every process holds the same state
    checkpointer.save({"stage": stage, "epoch": epoch, "speed": task.speed,
                       "student": task.student.state_dict(),
                       "extra": extra.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
                       "generator": task.generator.get_state(), "records": records,
                       "average": average.state_dict() if average is not None else None})
