"""Full-data distillation (the CIFAR-100 benchmark protocol): CE + logit KD + one feature distiller.

The same code for one process or many, its epochs in the one training loop (:mod:`graftkd.engine.training`): under ``torchrun`` the process group is set up from the environment
(gloo on CPU, NCCL on CUDA), the objective (student + the distiller's trainable modules) is wrapped in
``DistributedDataParallel`` and every process reads its share of each epoch through a
``DistributedSampler``. The data order and the augmentation of every image depend only on
(seed, epoch, image index), never on the number of processes: process r's i-th batch is the r-th
interleaved share of the single-process run's i-th batch, so with per-sample losses (CE, KD) and no
BatchNorm a 2-process run equals the 1-process run up to float summation order (tested). BatchNorm
statistics are per process unless ``sync_bn`` (CUDA only) is on.

Protocol (RepDistiller / CRD): SGD lr 0.05 (0.01 for MobileNetV2/ShuffleNet students), momentum 0.9,
wd 5e-4, global batch 64, 240 epochs, x0.1 at 150/180/210, KD at T=4 (batchmean KL x T^2). The
student reported is the **last epoch**; the best epoch's test accuracy is also recorded, labelled as
selected on the test split, only to compare with papers that report it.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from graftkd.engine.checkpoint import Checkpointer, fingerprint
from graftkd.engine.hooks import FeatureTap
from graftkd.engine.runtime import autocast, resolve_precision
from graftkd.engine.signals import StopRequest
from graftkd.engine.training import StageRun, run_stage
from graftkd.errors import GraftkdError, Interrupted
from graftkd.schema import option

from graftkd.engine.distributed import World, _barrier, _Closure, _wrap, broadcast_object, init_distributed  # noqa: F401

SMALL_LR_STUDENTS = ("mobilenetv2", "shufflev1", "shufflev2")


@dataclass
class KDRecipe:
    epochs: int = field(default=240, metadata=option("passes over the training set"))
    batch_size: int = field(default=64, metadata=option("global batch, split over processes"))
    lr: float | None = field(default=None, metadata=option(  # None: the protocol's rate for the student
        "SGD learning rate (default: 0.05, 0.01 for MobileNetV2/ShuffleNet students)"))
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210], metadata=option(
        "epochs where the rate drops x0.1, comma-separated"))
    gamma: float = 0.1
    temperature: float = field(default=4.0, metadata=option("KD temperature"))
    ce_weight: float = 1.0
    kd_weight: float = field(default=1.0, metadata=option("alpha: weight of logit KD (0: off)"))
    distiller: str | None = field(default=None, metadata=option(  # None: CE (+ KD) only
        "feature distiller (`graftkd methods`), or none (the default)"))
    distiller_weight: float | None = field(default=None, metadata=option(  # None: the distiller's benchmark default
        "beta (default: the benchmark's value for the distiller)"))
    distiller_options: dict = field(default_factory=dict)
    padding: int = 4
    flip: bool = True
    seed: int = 0
    precision: str = field(default="auto", metadata=option(
        "auto (default): bf16 autocast on CUDA and on CPUs with native bf16, else fp32", words=("auto", "fp32", "bf16")))
    eval_every: int = field(default=1, metadata=option("epochs between test evaluations (0: last only)"))
    sync_bn: bool = field(default=False, metadata=option("SyncBatchNorm across processes (CUDA only)"))
    adaptive: str = field(default="none", metadata=option(
        "sakd: spot-adaptive KD; anti: its inverted-mask ablation; none: fixed spots",
        words=("none", "sakd", "anti")))
    tau: float = 5.0  # SAKD's Gumbel-softmax temperature
    agent_gamma: float = 1.0  # SAKD's gamma (weights the routed CE)
    homo: bool | None = field(default=None, metadata=option(  # None = when teacher and student share a family
        "SAKD: start from distilling everywhere (auto, the default: when teacher and student share a family)",
        words={"auto": None, "yes": True, "no": False}))
    # the routing pass is then half the steps
    agent_every: int = field(default=1, metadata=option(
        "SAKD: update the agent (policy, routing adapters) on every N-th step only; the policy still picks every "
        "step's spots. 1 (default) is the paper's; 2 bounds a step at 2x a standard one", metavar="N"))

    def resolved_lr(self, student_arch: str) -> float:
        if self.lr is not None:
            return self.lr
        return 0.01 if student_arch.startswith(SMALL_LR_STUDENTS) else 0.05

    def protocol(self, student_arch: str) -> str:
        name = self.distiller or "none"
        beta = "" if self.distiller is None else f", beta={self.distiller_weight if self.distiller_weight is not None else 'default'}"
        adaptive = {"none": "fixed spots", "sakd": "spot-adaptive (SAKD, tau 5, agent SGD lr/2 wd 1e-3)",
                    "anti": "anti spot-adaptive (inverted SAKD masks)"}[self.adaptive]
        return (f"{adaptive}; SGD lr {self.resolved_lr(student_arch)} momentum {self.momentum} wd {self.weight_decay}, global batch "
                f"{self.batch_size}, {self.epochs} epochs, x{self.gamma} at {self.milestones}; loss = {self.ce_weight}*CE + "
                f"{self.kd_weight}*KD(T={self.temperature}, batchmean x T^2) + distiller {name}{beta}; crop (pad "
                f"{self.padding}) + flip; reported: last epoch (best epoch = max test accuracy over evaluated epochs, "
                "selected on the test split, for comparison with papers only)")


class TrainInterrupted(Interrupted):
    """SIGINT/SIGTERM: state saved; re-running the same command resumes."""


# ----------------------------------------------------------------------------------------- data
def training_subset(labels: torch.Tensor, limit: int) -> torch.Tensor:
    """Indices of a fixed (seed 0) random subset of ``limit`` images, the same for every run and seed.

    Datasets are often stored class by class, so "the first N images" would be a few classes only.
    """
    if not 0 < limit <= len(labels):
        raise GraftkdError(f"limit_train must be in 1..{len(labels)}, got {limit}")
    return torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:limit].sort().values


def epoch_indices(n: int, epoch: int, seed: int, world: World) -> torch.Tensor:
    """This process's share of the epoch's shuffled order (a DistributedSampler; drop_last keeps shares equal)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    return torch.tensor(list(iter(sampler)), dtype=torch.int64)


def epoch_augmentation(n: int, epoch: int, recipe: KDRecipe, device: torch.device):
    """Crop offsets and flips for every image of the epoch, from (seed, epoch) alone: world-size independent."""
    from graftkd.data.augment import crop_flip_params

    generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + epoch)
    return crop_flip_params(n, recipe.padding, recipe.flip, generator, device)


# ----------------------------------------------------------------------------------------- loop
def _features(model: nn.Module) -> list[str]:
    paths = getattr(model, "feature_paths", None)
    if paths is None:
        raise GraftkdError(f"{type(model).__name__} does not list its stages (feature_paths): a feature distiller "
                           "needs a zoo model with stage_parts()")
    return paths()


def spot_distiller(name: str, student: nn.Module, teacher: nn.Module, sample: torch.Tensor,
                   options: dict | None = None):
    """A zoo distiller between two zoo models, with the student and teacher feature paths it reads (at the
    spots its ``spot_kind`` names; shapes from one probe ``sample``)."""
    from graftkd.distill.zoo import build_distiller, resolve_spots

    s_all, t_all = _features(student), _features(teacher)
    spots = resolve_spots(_spot_kind(name), len(s_all), len(t_all))
    s_paths, t_paths = [s_all[i] for i, _ in spots], [t_all[j] for _, j in spots]
    distiller = build_distiller(name, _spot_shapes(student, s_paths, sample), _spot_shapes(teacher, t_paths, sample),
                                **(options or {}))
    return distiller, s_paths, t_paths


def _spot_shapes(model: nn.Module, paths: list[str], sample: torch.Tensor) -> list[tuple[int, ...]]:
    was = model.training
    model.eval()
    with torch.no_grad(), FeatureTap(model, paths) as tap:
        model(sample)
        shapes = [tuple(tap.features[p].shape[1:]) for p in paths]
    model.train(was)
    return shapes


def train_kd(
    student: nn.Module,
    teacher: nn.Module | None,
    train: tuple[torch.Tensor, torch.Tensor],
    *,
    normalize: nn.Module,
    recipe: KDRecipe,
    device: torch.device,
    student_arch: str = "",
    teacher_arch: str = "",
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    run_dir: str | Path | None = None,
    world: World | None = None,
    progress: bool = True,
) -> dict:
    """Train ``student`` on labeled uint8 ``train`` images with CE (+ KD from ``teacher``) (+ a distiller).

    Resumable from ``run_dir`` (epoch granularity); returns the history and the last/best test accuracy.
    """
    from graftkd.distill.losses import kd_loss
    from graftkd.engine.evaluate import evaluate_model

    world = world or World()
    images, labels = train
    if len(images) != len(labels):
        raise GraftkdError(f"{len(images)} training images but {len(labels)} labels")
    if recipe.batch_size % world.size:
        raise GraftkdError(f"global batch {recipe.batch_size} does not split over {world.size} processes: "
                           f"use a multiple of {world.size}")
    local_batch = recipe.batch_size // world.size
    steps = (len(images) // world.size) // local_batch
    if steps == 0:
        raise GraftkdError(f"{len(images)} training images is less than one global batch of {recipe.batch_size}")
    if (recipe.kd_weight > 0 or recipe.distiller) and teacher is None:
        raise GraftkdError("KD and feature distillers need a teacher")
    torch.manual_seed(recipe.seed)  # same distiller initialisation on every process
    precision = resolve_precision(device, recipe.precision, cpu_bf16=True)
    student.to(device)
    if recipe.sync_bn and world.size > 1:
        if device.type != "cuda":
            raise GraftkdError("sync_bn needs CUDA (PyTorch's SyncBatchNorm does not run on the CPU)")
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    normalize = normalize.to(device)
    images, labels = images.to(device), labels.to(device)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    distiller, s_paths, t_paths = None, [], []
    if recipe.distiller:
        distiller, s_paths, t_paths = spot_distiller(recipe.distiller, student, teacher, normalize(images[:2]),
                                                     recipe.distiller_options)
        distiller.to(device)
    beta = (recipe.distiller_weight if recipe.distiller_weight is not None
            else (type(distiller).weight if distiller is not None else 0.0))
    adaptive, agent_opt, agent_sched, gumbel = None, None, None, None
    if recipe.adaptive not in ("none", "sakd", "anti"):
        raise GraftkdError(f"unknown adaptive mode '{recipe.adaptive}': use none, sakd or anti")
    if recipe.agent_every < 1:
        raise GraftkdError(f"agent_every must be >= 1 (got {recipe.agent_every}): 1 updates SAKD's agent every step")
    if recipe.adaptive != "none":
        adaptive, s_paths, t_paths = _build_adaptive(recipe, student, teacher, distiller, s_paths, t_paths,
                                                     normalize(images[:2]), student_arch, teacher_arch, world, device)
        gumbel = torch.Generator().manual_seed(recipe.seed + 7919 + 104729 * world.rank)  # own samples per process

    checkpointer = Checkpointer(run_dir if world.main else None,
                                fingerprint({"recipe": asdict(recipe), "n": len(images), "world": world.size,
                                             "student": student_arch}), "fulldata")
    reader = Checkpointer(run_dir, checkpointer.fingerprint, "fulldata")
    resume_from = reader.load() if run_dir else None
    checkpointer.seconds_before = reader.seconds_before  # every process reads; only the main one writes
    state: dict = resume_from or {"phase": 0, "epoch": 0, "history": [], "init_history": []}
    if recipe.precision == "auto":
        # a resumed run keeps the setting it started with; a new one takes the setting timed on this machine
        # (under torchrun the first process times it and every process takes its choice); a checkpoint written
        # before runs recorded their setting resumes as it began: contiguous, in the resolved precision
        if resume_from is None:
            timed = (_remembered_kd_setting(student, teacher, images, labels, normalize, recipe, local_batch, device)
                     if world.main else None)
            state["speed"] = broadcast_object(world, timed)
        if state.get("speed"):
            precision = state["speed"]["chosen"]["precision"]
    channels_last = bool(state.get("speed") and state["speed"]["chosen"]["channels_last"])
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        student.to(memory_format=memory_format)
        if teacher is not None:
            teacher.to(memory_format=memory_format)
        if adaptive is not None:  # the routing adapters read the same maps
            adaptive.to(memory_format=memory_format)

    def taps():
        return FeatureTap(student, s_paths), FeatureTap(teacher, t_paths) if teacher is not None else None

    # --- pre-training stages (FT paraphraser, AB/FSP init, FitNet hint), described by the distiller
    init_stages = distiller.init_stages() if distiller is not None else []
    if resume_from is not None:
        _load_modules(student, distiller, resume_from)
        if adaptive is not None and resume_from.get("adaptive") is not None:
            adaptive.load_state_dict(resume_from["adaptive"])
            gumbel.set_state(resume_from["gumbel"])
    stop = StopRequest()

    def interrupted(where: str) -> TrainInterrupted:
        discarded = " (its partial work is discarded)" if where.startswith("during") else ""
        return TrainInterrupted(f"stopped by {stop.signal_name} {where}{discarded}; {checkpointer.last_good()}: "
                                "re-run the same command to resume")

    # one process stops within an epoch at once: the epoch restarts from its saved start on resume, and data
    # order and augmentation depend only on (seed, epoch), so nothing changes; under DDP every process must
    # stop at the same point, an epoch's end
    mid_epoch = "discard" if world.size == 1 else "no"

    def batches(epoch: int, _first: int):
        for batch_index, (x, y) in enumerate(_batches(images, labels, epoch, recipe, world, local_batch, steps,
                                                      normalize, device)):
            yield epoch * steps + batch_index, x.contiguous(memory_format=memory_format), y

    with stop:
        for index, stage in enumerate(init_stages):
            if state["phase"] > index:
                for module in stage.freeze_after:
                    module.requires_grad_(False)
                continue
            _init_stage(stage, index, state, resume_from, student, teacher, distiller, taps, world, device, precision,
                        checkpointer, batches, interrupted, mid_epoch, stop)
            for module in stage.freeze_after:
                module.requires_grad_(False)
            state.update(phase=index + 1, epoch=0)
            _save(checkpointer, state, student, distiller, None, None)
            _barrier(world)

        # --- main training
        modules = {"student": student}
        if distiller is not None:
            modules.update({f"distiller{i}": m for i, m in enumerate(distiller.student_modules())})
        closure = _Closure(modules)
        wrapped = _wrap(closure, world, device)
        lr = recipe.resolved_lr(student_arch)
        optimizer = torch.optim.SGD([p for p in closure.parameters() if p.requires_grad], lr=lr,
                                    momentum=recipe.momentum, weight_decay=recipe.weight_decay)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=recipe.milestones, gamma=recipe.gamma)
        agent_wrapped = None
        if adaptive is not None:  # the agent's own optimiser: the spec's lr/2, momentum 0.9, wd 1e-3, same milestones
            agent_wrapped = _wrap(_Closure({"agent": adaptive}), world, device)  # DDP keeps the agents in step
            agent_opt = torch.optim.SGD(adaptive.parameters(), lr=lr / 2, momentum=0.9, weight_decay=1e-3)
            agent_sched = torch.optim.lr_scheduler.MultiStepLR(agent_opt, milestones=recipe.milestones, gamma=recipe.gamma)
        main_phase = len(init_stages)
        first_epoch = state["epoch"] if state["phase"] == main_phase else 0
        if resume_from is not None and state["phase"] == main_phase and resume_from.get("optimizer"):
            optimizer.load_state_dict(resume_from["optimizer"])
            scheduler.load_state_dict(resume_from["scheduler"])
            if adaptive is not None:
                agent_opt.load_state_dict(resume_from["agent_optimizer"])
                agent_sched.load_state_dict(resume_from["agent_scheduler"])
        bar = tqdm(total=recipe.epochs, initial=first_epoch, unit="ep", disable=not (progress and world.main),
                   dynamic_ncols=True, desc=recipe.distiller or ("kd" if recipe.kd_weight else "ce"))
        started = time.perf_counter()
        epoch_sums: dict = {}  # what an epoch counts besides its loss terms (host reads at its end only)

        def set_modes() -> None:
            if distiller is not None:
                distiller.train()
            student.train()
            epoch_sums.update(correct=torch.zeros((), device=device), t0=time.perf_counter(), last=None,
                              routed=torch.zeros(len(adaptive.router.spots) + 1 if adaptive is not None else 0,
                                                 device=device))

        def step(batch) -> dict[str, torch.Tensor]:
            step_index, x, y = batch

            def forward():
                terms: dict[str, torch.Tensor] = {}
                t_logits = None
                if teacher is not None:
                    with torch.no_grad(), autocast(device, precision):
                        t_logits = teacher(x).float()
                with autocast(device, precision):
                    logits = student(x).float()
                terms["ce"] = recipe.ce_weight * F.cross_entropy(logits, y)
                s_feats = [s_tap.features[p].float() for p in s_paths]
                t_feats = [t_tap.features[p].detach().float() for p in t_paths] if t_tap else []
                if adaptive is not None:
                    # the teacher's first-spot output as its pass made it (its own dtype: the routing pass runs
                    # in the step's precision, and an upcast copy would change what the next segment computes)
                    first = (t_tap.features[t_paths[adaptive.first_teacher_spot]].detach()
                             if adaptive.first_teacher_spot is not None else None)
                    return _adaptive_terms(adaptive, agent_wrapped, agent_opt, recipe, distiller, beta, x, y, student,
                                           teacher, logits, t_logits, s_feats, t_feats, first, gumbel, terms,
                                           precision, step_index)
                if recipe.kd_weight > 0:
                    terms["kd"] = recipe.kd_weight * kd_loss(logits, t_logits, recipe.temperature)
                if distiller is not None:
                    terms[recipe.distiller] = beta * distiller(s_feats, t_feats)
                return {"terms": terms, "logits": logits}
            epoch_sums["last"] = wrapped(forward)
            return epoch_sums["last"]["terms"]

        def after_step(batch) -> None:
            extra = epoch_sums["last"]
            epoch_sums["correct"] += (extra["logits"].detach().argmax(1) == batch[2]).sum()
            if "policy" in extra:
                epoch_sums["routed"] += extra["policy"]

        def update(loss: torch.Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def end_epoch(epoch: int, terms: dict[str, float] | None) -> None:
            epoch_lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            if agent_sched is not None:
                agent_sched.step()
            seconds = time.perf_counter() - epoch_sums["t0"]
            record = {"epoch": epoch, "lr": epoch_lr, "loss": terms,
                      "train_acc_local": 100.0 * float(epoch_sums["correct"]) / (steps * local_batch),
                      "images_per_second": steps * local_batch * world.size / seconds}
            if adaptive is not None:  # the policy statistics: fraction of samples distilled at each spot
                record["policy_fraction"] = [float(v) / (steps * local_batch) for v in epoch_sums["routed"]]
            if test is not None and world.main and (epoch == recipe.epochs or (recipe.eval_every and epoch % recipe.eval_every == 0)):
                record["test_acc"] = evaluate_model(student, test[0], test[1], normalize, device, precision=precision,
                                                    channels_last=channels_last)
            state["history"].append(record)
            state.update(phase=main_phase, epoch=epoch)
            line = (f"epoch {epoch}/{recipe.epochs} loss {sum(terms.values()):.4f} lr {record['lr']:.4g} "
                    f"{record['images_per_second']:.0f} img/s"
                    + (f" test {record['test_acc']:.2f}%" if "test_acc" in record else ""))
            if progress and world.main:
                bar.set_postfix_str(line.split(" ", 2)[2])
            elif world.main:
                tqdm.write(line)

        def save(_epoch: int, _step: int, _running: dict) -> None:
            extra_state = {} if adaptive is None else {
                "adaptive": adaptive.state_dict(), "gumbel": gumbel.get_state(),
                "agent_optimizer": agent_opt.state_dict(), "agent_scheduler": agent_sched.state_dict()}
            _save(checkpointer, {**state, **extra_state}, student, distiller, optimizer, scheduler)
            _barrier(world)

        s_tap, t_tap = taps()
        try:
            with s_tap, (t_tap if t_tap is not None else contextlib.nullcontext()):
                run_stage(StageRun(
                    name="main training", epochs=recipe.epochs, batches=batches, step=step, update=update,
                    interrupted=interrupted, last_good=checkpointer.last_good, save=save, set_modes=set_modes,
                    after_step=after_step, end_epoch=end_epoch, logged_only=("agent",), mid_epoch=mid_epoch,
                    bar=bar, steps_before=first_epoch * steps), first_epoch=first_epoch, stop=stop)
        finally:
            bar.close()
            if channels_last:  # hand back plain tensors (saving, export, evaluation)
                student.to(memory_format=torch.contiguous_format)
                if teacher is not None:
                    teacher.to(memory_format=torch.contiguous_format)
    evaluated = [h for h in state["history"] if "test_acc" in h]
    best = max(evaluated, key=lambda h: h["test_acc"]) if evaluated else None
    return {
        "history": state["history"], "init_history": state["init_history"],
        "last_epoch_test_acc": evaluated[-1]["test_acc"] if evaluated and evaluated[-1]["epoch"] == recipe.epochs else None,
        "best_epoch": {"epoch": best["epoch"], "test_acc": best["test_acc"],
                       "note": "max over evaluated epochs of the test accuracy: selected on the test split, "
                               "reported only to compare with papers that do so"} if best else None,
        "world_size": world.size, "local_batch": local_batch, "steps_per_epoch": steps, "lr": lr,
        "distiller": recipe.distiller, "distiller_weight": beta if distiller is not None else None,
        "speed": state.get("speed"),
        "spots": {"student": s_paths, "teacher": t_paths}, "precision": precision, "adaptive": recipe.adaptive,
        "routing_spots": ([list(p) for p in adaptive.router.spots] if adaptive is not None else None),
        "seconds": time.perf_counter() - started, "protocol": recipe.protocol(student_arch),
    }


def _remembered_kd_setting(student, teacher, images, labels, normalize, recipe, local_batch, device) -> dict:
    """The fastest precision and memory format of this run's step on this machine, timed once per machine, pair
    and batch and remembered in the graftkd cache (``engine.loop.remember_setting``): the teacher's pass, the
    student's and CE + KD, the bulk of every method's step (a distiller's and SAKD's extra parts run in the
    same setting)."""
    from graftkd.distill.losses import kd_loss
    from graftkd.engine.loop import remember_setting, settings_key, time_settings

    index = torch.arange(local_batch) % len(images)
    x, y = normalize(images[index].to(device)).float(), labels[index].to(device)

    def one_pass(batch, precision):
        with autocast(device, precision):
            logits = student(batch).float()
        loss = F.cross_entropy(logits, y)
        if teacher is not None:
            with torch.no_grad(), autocast(device, precision):
                t_logits = teacher(batch).float()
            loss = loss + kd_loss(logits, t_logits, recipe.temperature)
        return loss

    def measure():
        was_training = student.training
        student.train()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                return time_settings(student, teacher, x, one_pass, device,
                                     what="of the teacher's and the student's passes with CE + KD")
        finally:
            student.train(was_training)

    key = settings_key(device, teacher, student, local_batch, images.shape[1:], method="fulldata-kd")
    return remember_setting(key, measure)


def _init_stage(stage, index, state, resume_from, student, teacher, distiller, taps, world, device, precision,
                checkpointer, batches, interrupted, mid_epoch, stop) -> None:
    """A distiller's pre-training stage (FT's paraphraser, AB/FSP init, FitNet's hint) in the one loop."""
    modules = {f"m{i}": m for i, m in enumerate(stage.modules)}
    if stage.train_student:
        modules["student"] = student
    closure = _Closure(modules)
    wrapped = _wrap(closure, world, device)
    params = [p for p in closure.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=stage.lr, momentum=stage.momentum, weight_decay=stage.weight_decay)
    first = state["epoch"] if resume_from is not None and state["phase"] == index else 0
    if first and resume_from.get("optimizer"):
        optimizer.load_state_dict(resume_from["optimizer"])
    s_tap, t_tap = taps()

    def step(batch) -> dict[str, torch.Tensor]:
        _index, x, _y = batch

        def forward():
            with torch.no_grad(), autocast(device, precision):
                teacher(x)
            t_feats = [t_tap.features[p].detach().float() for p in t_tap.paths]
            with torch.set_grad_enabled(stage.train_student), autocast(device, precision):
                student(x)
            s_feats = [s_tap.features[p].float() for p in s_tap.paths]
            return {"loss": stage.loss(s_feats, t_feats)}
        return wrapped(forward)

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def end_epoch(epoch: int, means: dict[str, float] | None) -> None:
        state["init_history"].append({"stage": stage.name, "epoch": epoch, "loss": means["loss"]})
        state.update(phase=index, epoch=epoch)

    with s_tap, t_tap:
        run_stage(StageRun(
            name=f"init stage '{stage.name}'", epochs=stage.epochs, batches=batches, step=step, update=update,
            interrupted=interrupted, last_good=checkpointer.last_good,
            save=lambda *_: _save(checkpointer, state, student, distiller, optimizer, None),
            set_modes=lambda: student.train(stage.train_student), end_epoch=end_epoch, mid_epoch=mid_epoch),
            first_epoch=first, stop=stop)


def _build_adaptive(recipe, student, teacher, distiller, s_paths, t_paths, sample, student_arch, teacher_arch,
                    world, device):
    """SAKD's agent; returns it and the feature paths the loop must tap (distiller spots + embeddings)."""
    from graftkd.distill.sakd import SpotAdaptive, same_family
    from graftkd.distill.zoo import resolve_spots

    if teacher is None:
        raise GraftkdError("spot-adaptive KD needs a teacher")
    s_all, t_all = _features(student), _features(teacher)
    kind = distiller.spot_kind if distiller is not None else None
    # routing spots: the distiller's spots; FSP reads pairs (f_k, f_k+1), routed at their ends f_1..f_R
    routing = [] if kind is None else resolve_spots("stages" if kind == "all" else kind, len(s_all), len(t_all))
    s_shapes = _spot_shapes(student, [s_all[i] for i, _ in routing], sample)
    t_shapes = _spot_shapes(teacher, [t_all[j] for _, j in routing], sample)
    (s_dim,), (t_dim,) = _spot_shapes(student, [s_all[-1]], sample)[0], _spot_shapes(teacher, [t_all[-1]], sample)[0]
    homo = recipe.homo if recipe.homo is not None else same_family(teacher_arch, student_arch)
    first = t_paths.index(t_all[routing[0][1]]) if routing and t_all[routing[0][1]] in t_paths else None
    agent = SpotAdaptive(routing, s_shapes, t_shapes, s_dim, t_dim, homo, recipe.tau, recipe.agent_gamma,
                         anti=recipe.adaptive == "anti", first_teacher_spot=first).to(device)
    # the loop taps the distiller's spots and, last, both embeddings (the policy's input)
    return agent, s_paths + [s_all[-1]], t_paths + [t_all[-1]]


def _adaptive_terms(adaptive, agent_wrapped, agent_opt, recipe, distiller, beta, x, y, student, teacher, logits,
                    t_logits, s_feats, t_feats, teacher_first, gumbel, terms, precision, step_index):
    """One SAKD agent update, then the student's masked terms (the spec's two-optimiser order).

    ``teacher_first``: the teacher's output at the first routing spot, tapped from this step's own teacher pass.
    The routing pass runs in the step's precision and memory format, so that is the very tensor it would
    compute (nothing upstream of it trains), and it is read instead of computed again."""
    from graftkd.distill.sakd import masked_student_terms

    s_emb, t_emb = s_feats.pop(), t_feats.pop()
    route = step_index % recipe.agent_every == 0
    agent_loss, masks = agent_wrapped(lambda: adaptive.agent_step(x, y, student, teacher, logits, s_emb, t_emb, gumbel,
                                                                  teacher_first=teacher_first, route=route,
                                                                  precision=precision))
    if agent_loss is not None:
        agent_opt.zero_grad(set_to_none=True)
        agent_loss.backward()
        agent_opt.step()
    terms.update(masked_student_terms(masks, distiller, beta, recipe.kd_weight, recipe.temperature, logits,
                                      t_logits, s_feats, t_feats))
    if agent_loss is not None:
        terms["agent"] = agent_loss.detach()  # logged, not part of the student's loss
    policy = (masks ^ adaptive.anti).float().sum(dim=0)  # the policy's own decisions (before any inversion)
    return {"terms": terms, "logits": logits, "policy": policy}  # the loop trains on every term but "agent"


def _spot_kind(name: str) -> str:
    from graftkd.distill.zoo import distiller_class

    return distiller_class(name).spot_kind


def _batches(images, labels, epoch, recipe, world, local_batch, steps, normalize, device):
    from graftkd.data.augment import apply_crop_flip

    order = epoch_indices(len(images), epoch, recipe.seed, world).to(device)
    oy, ox, flips = epoch_augmentation(len(images), epoch, recipe, device)
    for i in range(steps):
        idx = order[i * local_batch:(i + 1) * local_batch]
        x = apply_crop_flip(images[idx], oy[idx], ox[idx], flips[idx], recipe.padding)
        yield normalize(x), labels[idx]


def _save(checkpointer: Checkpointer, state: dict, student: nn.Module, distiller: nn.Module | None,
          optimizer, scheduler) -> None:
    checkpointer.save({**state, "student": student.state_dict(),
                       "distiller": distiller.state_dict() if distiller is not None else None,
                       "optimizer": optimizer.state_dict() if optimizer is not None else None,
                       "scheduler": scheduler.state_dict() if scheduler is not None else None})


def _load_modules(student: nn.Module, distiller: nn.Module | None, state: dict) -> None:
    student.load_state_dict(state["student"])
    if distiller is not None and state.get("distiller") is not None:
        distiller.load_state_dict(state["distiller"])
