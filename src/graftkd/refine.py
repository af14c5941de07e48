"""The derived student's road after its derivation, and the shared way a few-shot method is run: the
resolver that chooses repair, loss and fading (and records why), BatchNorm at the start, the refinement, and
the label-free estimate every run reports."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace as with_changes
from pathlib import Path

import torch
from torch import nn

from graftkd.derive import DEPTH_RULES, INITS, WIDTH_RULES
from graftkd.engine.recipe import Recipe
from graftkd.engine.runtime import seed_everything
from graftkd.errors import GraftkdError
from graftkd.graft import GraftConfig, graft
from graftkd.loaded import LoadedModel, num_outputs
from graftkd.schema import option


@dataclass(frozen=True)
class DeriveOptions:
    """How ``distill`` builds and refines a student from the teacher's own weights (``graftkd.derive``)."""

    init: str = field(default="auto", metadata=option(
        "auto (default): build the student from the teacher's own weights (units and channels chosen) wherever it "
        "fits inside the teacher, else fresh; fresh: the paper's grafting", words=INITS))
    reason: str = ""  # why ``init`` is what it is, when the caller resolved it (recorded in result.json)
    # auto: greedy when the refinement is left to the resolver (``refine`` 'auto', the default path), even
    # otherwise, so rows that name their refinement keep the rule they were made with
    depth_rule: str = field(default="auto", metadata=option(
        "which teacher units a shallower student stage takes (greedy: by few-shot logit error; auto, the default: "
        "greedy when the refinement is left to the resolver, even when --refine/--refine-loss/--repair is given)", words=("auto", *DEPTH_RULES)))
    width_rule: str = field(default="l1", metadata=option(
        "which teacher channels a narrower student layer takes", words=WIDTH_RULES))
    bn_start: str = field(default="auto", metadata=option(
        "derived students' BatchNorm statistics: the teacher's, re-estimated on the images, or auto (whichever "
        "gives the smaller few-shot logit error)", words=("auto", "teacher", "reestimate")))
    # auto: repair, refinement and loss chosen from the derivation (``resolve_refinement``); `distill` takes it
    # when none of them is given
    refine: str = field(default="kd", metadata=option(
        "derived students: auto (the default with --init auto when neither --repair nor --refine-loss is given: "
        "repair, training and loss chosen from the derivation, recorded in result.json), patient KD (the default "
        "otherwise), grafting stages (paper recipe), or no training", words=("auto", "kd", "graft", "none")))
    repair: bool = field(default=False, metadata=option(
        "derived students: closed-form least-squares 1x1 corrections before any step (FSKD's)"))
    # the repair's regression also sees this many augmented copies (crop + flip) of every few-shot image
    repair_views: int = field(default=0, metadata=option(
        "--repair: also regress on N crop-and-flip copies of every few-shot image", metavar="N"))
    repair_ridge: float = field(default=1e-4, metadata=option(
        "--repair: ridge towards the identity, relative to the Gram matrix's mean diagonal"))
    loss: str = field(default="kd", metadata=option(
        "derived students, --refine kd: KD on logits (kd, the default), KD plus the teacher's feature maps "
        "(feature_kd), or FitNet's hint stage then KD (fitnet)", flag="--refine-loss",
        words=("kd", "feature_kd", "fitnet")))
    unit_features: bool = field(default=False, metadata=option(
        "--refine-loss feature_kd after a depth derivation: also match every kept unit's output"))
    # None: refine 'auto' chooses (``resolve_refinement``), any other refinement cuts them (0)
    fade: float | None = field(default=None, metadata=option(
        "students derived in one piece, --refine kd or auto: start from the whole teacher and fade the dropped units "
        "and channels out over this share of the budget (0: cut them before the first step; default: 0.25 with "
        "--refine auto when only units were chosen, else 0)", metavar="SHARE"))
    # None: refine 'auto' chooses (``resolve_refinement``), any other refinement 0
    synth_choice: int | None = field(default=None, metadata=option(
        "with --synth and the greedy depth rule: choose the units on the few-shot images plus the first N synthetic "
        "ones (0: the few-shot images only; default: the default path's choice, else 0)", metavar="N"))
    loss_options: dict = field(default_factory=dict)  # the loss method's own options, e.g. {"temperature": 1.0}
    recipe: Recipe = field(default_factory=Recipe)

    def __post_init__(self) -> None:
        for name, value, allowed in (("init", self.init, INITS), ("depth rule", self.depth_rule, ("auto", *DEPTH_RULES)),
                                     ("width rule", self.width_rule, WIDTH_RULES),
                                     ("bn start", self.bn_start, ("auto", "teacher", "reestimate")),
                                     ("refine", self.refine, ("auto", "kd", "graft", "none")),
                                     ("loss", self.loss, ("kd", "feature_kd", "fitnet"))):
            if value not in allowed:
                raise GraftkdError(f"unknown {name} '{value}': use one of {', '.join(allowed)}")
        if self.refine == "auto" and (self.repair or self.loss != "kd"):
            raise GraftkdError("refine 'auto' chooses the repair and the loss itself: give --refine kd|none to set them")
        if self.fade is not None and not 0.0 <= self.fade <= 1.0:
            raise GraftkdError(f"fade must be a share of the budget in [0, 1] (got {self.fade}); 0 cuts the dropped "
                               "units before the first step")
        if self.fade and (self.repair or self.refine not in ("kd", "auto") or self.loss not in ("kd", "feature_kd")
                          or self.unit_features):
            raise GraftkdError("fade trains the whole teacher while its dropped units and channels fade out: it goes "
                               "with the patient KD refinement (no --repair, --refine kd or auto, --refine-loss kd or "
                               "feature_kd at the stage boundaries)")
        if self.recipe.synth and self.refine in ("graft", "none"):
            raise GraftkdError(f"--synth {self.recipe.synth}: synthetic images feed the patient KD refinement; with "
                               f"--refine {self.refine} nothing would train on them: drop --synth or use --refine kd")
        if self.synth_choice is not None and self.synth_choice < 0:
            raise GraftkdError(f"--synth-choice must be >= 0 (got {self.synth_choice})")
        if self.repair_views < 0 or self.repair_ridge < 0:
            raise GraftkdError(f"repair views and ridge must be >= 0 (got {self.repair_views}, {self.repair_ridge})")

    def to_dict(self) -> dict:
        return {"init": self.init, "reason": self.reason, "depth_rule": self.depth_rule, "width_rule": self.width_rule,
                "bn_start": self.bn_start, "repair": self.repair, "refine": self.refine, "loss": self.loss,
                **({"repair_views": self.repair_views, "repair_ridge": self.repair_ridge} if self.repair else {}),
                "unit_features": self.unit_features, "fade": self.fade, "synth_choice": self.synth_choice,
                "loss_options": dict(self.loss_options), "recipe": self.recipe.to_dict()}


def resolve_depth_rule(options: DeriveOptions) -> tuple[str, str]:
    """The depth rule a derivation uses, and why. ``auto`` takes ``greedy`` on the default path: with the dropped
    units fading out, keeping the units whose removal changes the few-shot logits least gave 75.0 / 76.0 against
    72.0 / 73.7 % at K=1 and 82.2 / 83.0 against 83.8 / 82.4 % at K=10 (validation split, seeds 0 / 1, 128k samples,
    ``results/cifar10-derived/dev-amx``): a gain at K=1, a wash at K=10. A named refinement keeps ``even``, the
    rule its committed cells were made with."""
    if options.depth_rule != "auto":
        return options.depth_rule, "given"
    if options.refine == "auto":
        return "greedy", "auto: the default path takes the units whose removal changes the few-shot logits least"
    return "even", "auto: a named refinement keeps evenly spaced units"


def try_derive(teacher: nn.Module, student: nn.Module, images: torch.Tensor, norm: nn.Module,
                device: torch.device, options: DeriveOptions):
    """Derive ``student`` from the teacher, or say why not; ``--init derived`` makes a failure an error."""
    from graftkd.derive import Underivable, derive_student
    from graftkd.graft.blocks import resolve_blocks, trace_boundaries

    # damaged weights (NaN) and a forward that is not its blocks' composition are refused before any work
    trace_boundaries(teacher, resolve_blocks(teacher, role="teacher"),
                     torch.zeros((2, *images.shape[1:]), device=device), role="teacher")
    with torch.no_grad():
        inputs = norm.to(device)(images.to(device)).float()
    rule, rule_why = resolve_depth_rule(options)
    try:
        record = derive_student(teacher, student, tuple(images.shape[1:]), inputs=inputs,
                                depth_rule=rule, width_rule=options.width_rule)
    except Underivable as exc:
        if options.init == "derived":
            raise GraftkdError(f"--init derived: {exc}; use --init fresh for this pair") from exc
        return None, {"requested": options.init, "used": "fresh", "why": f"not derivable: {exc}"}
    if not record.derived_blocks:
        if options.init == "derived":
            raise GraftkdError(f"--init derived: no block of the student fits inside the teacher "
                               f"({record.fallback_reason}); use --init fresh for this pair")
        return None, {"requested": options.init, "used": "fresh",
                      "why": f"no block derivable: {record.fallback_reason}"}
    fresh = record.fresh_blocks
    why = ("every block derived from the teacher" if not fresh else
           f"blocks {', '.join(str(i + 1) for i in fresh)} fresh, the others derived")
    depth = ({"depth_rule": {"requested": options.depth_rule, "used": rule, "why": rule_why}}
             if record.depth is not None and record.depth.selections else {})
    return record, {"requested": options.init, "used": "derived", "why": why, **depth}


def _settle_synth(options: DeriveOptions, resolved: dict | None) -> DeriveOptions:
    """``options`` with the recipe's synthetic images and budget settled: the resolver's choice (``synth`` at its
    path's ``synth_budget``) where ``--synth`` was not given, none on any other path. A budget the user gave with
    ``--samples`` takes at most one image per ``SYNTH_SAMPLES_PER_IMAGE`` samples, so that a short run stays short.
    The resolver's record (``resolved``) gets the count and its reason."""
    recipe = options.recipe
    if recipe.synth is None:
        chosen = (resolved or {}).get("synth", 0)
        if recipe.samples is None:  # the path's own budget, chosen with its count of images
            budget, synth = (resolved or {}).get("synth_budget", SYNTH_BUDGET), chosen
        else:
            budget, synth = recipe.samples, min(chosen, recipe.samples // SYNTH_SAMPLES_PER_IMAGE)
        synth = synth if synth >= 2 else 0
        recipe = with_changes(recipe, synth=synth, samples=budget if synth else recipe.samples)
        why = (f", on the few-shot images and {synth} images synthesised from them and the teacher's BatchNorm "
               f"statistics ({recipe.budget} samples)" if synth else
               f"; no synthetic images at a budget under {2 * SYNTH_SAMPLES_PER_IMAGE} samples")
    else:
        why = f"; --synth {recipe.synth} given"
    if resolved is not None and "synth" in resolved:
        resolved["synth"] = recipe.synth
        resolved["why"] += why
    return with_changes(options, recipe=recipe)


def rederive(teacher: nn.Module, student: nn.Module, images: torch.Tensor, norm: nn.Module, device: torch.device,
             record):
    """``record``'s derivation again, with its rules, on other (uint8) ``images``: the student's weights and the
    record are replaced."""
    from graftkd.derive import derive_student

    with torch.no_grad():
        inputs = norm.to(device)(images.to(device)).float()
    return derive_student(teacher, student, tuple(images.shape[1:]), inputs=inputs, depth_rule=record.depth_rule,
                          width_rule=record.width_rule)


def refine_derived(teacher: LoadedModel, student: nn.Module, record, fewshot, norm: nn.Module, config: GraftConfig,
                    options: DeriveOptions, device: torch.device, out_dir: Path | None, progress: bool, world=None):
    """BatchNorm at the start, then the refinement; returns an object with ``.student`` and the facts to record."""
    from graftkd.distill.base import build_method

    images = fewshot.images.to(device)
    facts: dict = {"derive": options.to_dict()}
    if options.fade and not fadable(record):
        raise GraftkdError(f"fade {options.fade:g}: the dropped units and channels fade out of the whole teacher, so "
                           "the whole student must be derived in one piece; this derivation left blocks fresh or went "
                           "block by block (see its record): leave fade at 0")
    resolved = None
    if options.refine == "auto":
        resolved = resolve_refinement(record)
        fade = resolved["fade"] if options.fade is None else options.fade
        if options.fade is not None and resolved.get("fade_below"):  # a named --fade (0 too) decides, not the check
            resolved["fade_below"] = None
        if fade and resolved["repair"]:  # a fade the user named starts from the teacher: no repair to check first
            resolved.update(repair=False, stop_at=None, fade_below=None,
                            why=resolved["why"] + f"; --fade {fade:g} given: no repair, the start is the teacher")
        options = with_changes(options, refine="kd", repair=resolved["repair"], loss=resolved["loss"], fade=fade,
                               loss_options={**resolved.get("loss_options", {}), **options.loss_options})  # the user's win
        facts["resolved"] = resolved
    if options.fade is None:
        options = with_changes(options, fade=0.0)
    checked = resolved is not None and resolved["stop_at"] is not None
    if not checked:  # a checked path settles its images after the check: none are made for a student left untrained
        options = _settle_synth(options, resolved)
    facts["derive"]["fade"] = options.fade
    num_classes = num_outputs(teacher.model, images.shape[1:])
    shots = config.shots or max(1, len(images) // num_classes)
    choice = options.synth_choice if options.synth_choice is not None else (resolved or {}).get("synth_choice", 0)
    facts["derive"]["synth_choice"] = choice
    synthetic = None  # (training images, record) once made
    if (choice and options.refine == "kd" and options.recipe.synth and record.depth is not None
            and record.depth.selections and record.depth_rule == "greedy"):
        # the greedy rule keeps the units whose removal changes the logits least: on a few images that measure is
        # noisy, and the synthetic images stand for the teacher's training distribution
        synthetic = synthetic_images(teacher, images, norm, config, options.recipe, device, out_dir, progress,
                                     num_classes)
        extra = synthetic[0][len(images):len(images) + choice]
        record = rederive(teacher.model, student, torch.cat([images, extra]), norm, device, record)
        facts["derivation"] = record.to_dict()
        facts["derive"]["choice_images"] = {"few_shot": len(images), "synthetic": len(extra)}
        if resolved is not None:
            resolved["why"] += f"; the units chosen on the few-shot images and {len(extra)} synthetic ones"
    facts["derive"]["loss_options"] = dict(options.loss_options)
    facts["method"] = f"derived+{options.refine}"
    inputs = norm.to(device)(images).float()
    if options.repair:
        # the corrections make each layer's pre-norm output the teacher's, so the norms keep the teacher's statistics
        from graftkd.derive.repair import repair

        rows = inputs
        if options.repair_views > 0:  # more rows for the least squares: crop-and-flip copies, seeded by the run
            from graftkd.data import resolve_augment

            views = resolve_augment(fewshot.dataset, config.padding, config.flip)
            generator = torch.Generator().manual_seed(int(config.seed) + 104_729)
            rows = torch.cat([inputs] + [norm(views(images.cpu(), generator).to(device)).float()
                                         for _ in range(options.repair_views)])
        facts["repair"] = {**repair(teacher.model, student, record, rows, ridge=options.repair_ridge, progress=progress),
                           "images": len(rows), "augmented_views": options.repair_views}
        facts["bn_start"] = {"rule": "teacher (repair)", "used": "teacher"}
    elif options.fade:
        facts["bn_start"] = {"rule": "teacher (fade: the start is the whole teacher)", "used": "teacher"}
    else:
        facts["bn_start"] = _bn_start(teacher.model, student, record, inputs, options.bn_start)
    if resolved is not None and resolved["stop_at"] is not None:
        # the label-free estimate of the repaired student (the same pool and views the run reports at its end)
        estimate = label_free_estimate(student, teacher.model, images, norm, config, device, mixed=options.recipe.mix != "none")
        resolved["agreement_after_repair"] = estimate["agreement"]
        if estimate["agreement"] >= resolved["stop_at"]:
            options = with_changes(options, refine="none",
                                   recipe=with_changes(options.recipe, synth=options.recipe.synth or 0))
            resolved["refine"], resolved["loss"] = "none", None
            if "synth" in resolved:
                resolved["synth"] = options.recipe.synth
            resolved["why"] += (f"; the repaired student agrees with the teacher on {estimate['agreement']:.1f} % of "
                                f"the held-out views (>= {resolved['stop_at']:g} %): no training")
        else:
            hot = options.loss_options.get("temperature")  # absent: the loss's own default
            resolved["why"] += (f"; the repaired student agrees on {estimate['agreement']:.1f} % of the held-out views "
                                f"(< {resolved['stop_at']:g} %): patient KD"
                                + (f" at temperature {hot:g}" if hot else "") + " plus feature maps")
            if resolved.get("fade_below"):
                # the repaired weights are set aside: the student starts as the whole teacher, its channels fading out
                options = with_changes(options, repair=False, fade=resolved["fade_below"])
                facts["derive"]["fade"] = options.fade
                facts["repair"]["set_aside"] = True  # it ran for the check only
                facts["bn_start"] = {"rule": "teacher (fade: the start is the whole teacher)", "used": "teacher"}
                resolved["why"] += (f" from the whole teacher, the dropped channels fading out over the first "
                                    f"{options.fade:g} of the budget")
            options = _settle_synth(options, resolved)
        facts["method"] = f"derived+{options.refine}"
    facts["derive"]["recipe"] = options.recipe.to_dict()
    started = time.perf_counter()
    if options.refine == "graft":
        graft_config = with_changes(config, freeze_norm_stats=True, inherit="none")
        result = graft(teacher.model, student, images, normalize=norm, config=graft_config, device=device,
                       run_dir=out_dir, progress=progress, init_adapters=lambda plan: derived_adapters(plan, record))
        facts["refine"] = result.summary()
        return result, facts
    if options.refine == "kd":
        recipe = options.recipe
        trained = student
        taps = {}
        if options.fade and record.width is not None and record.width.narrowed():
            from graftkd.derive.fade import NarrowingStudent

            if options.loss == "feature_kd":  # the stage boundaries both models have, with the channels kept there
                shared = set(teacher.model.feature_paths()[:-1]) if hasattr(teacher.model, "feature_paths") else set()
                kept = _feature_channels(student, record)
                taps = {p: kept.get(p) for p in getattr(student, "feature_paths", lambda: [])()[:-1] if p in shared}
            trained = NarrowingStudent(teacher.model, student, record, round(options.fade * recipe.steps),
                                       taps=taps).to(device)
            facts["fade"] = {"share": options.fade, "steps": trained.steps, "faded_units": trained.faded,
                             "faded_readers": trained.readers}
        elif options.fade:
            from graftkd.derive.fade import FadingStudent

            trained = FadingStudent(teacher.model, record.depth, round(options.fade * recipe.steps)).to(device)
            facts["fade"] = {"share": options.fade, "steps": trained.steps, "faded_units": trained.faded}
        train_images, facts["synth"] = synthetic or synthetic_images(teacher, images, norm, config, recipe, device,
                                                                     out_dir, progress, num_classes)
        task = few_shot_task(teacher, trained, train_images, norm, config, device, out_dir, progress, world,
                              batch_size=recipe.batch_size, epochs=recipe.chunks, lr=recipe.lr, shots=shots,
                              num_classes=num_classes, recipe=recipe, inherit="none")
        method = build_method(options.loss, options.loss_options)
        if options.loss == "feature_kd":
            method.select = _feature_channels(student, record)
            if options.unit_features:
                method.pairs = unit_pairs(record)
            if taps:  # the narrowing student hands the kept channels at each stage boundary to ``taps.<i>``
                method.pairs = [(f"taps.{i}", path) for i, path in enumerate(taps)]  # student tap, teacher path
                method.select = dict(trained.tap_channels)
            elif trained is not student:  # the fading student is the teacher's copy under ``net``: same boundaries
                method.pairs = [(f"net.{path}", path) for path in teacher.model.feature_paths()[:-1]]
        outcome = method.run(task)
        if trained is not student:
            student.load_state_dict(trained.student_state_dict(student), strict=True)
        facts["refine"] = {"stages": outcome.stages, **outcome.extra}
    else:
        facts["refine"] = None
    student.eval()
    return _Refined(student, shots, time.perf_counter() - started), facts


#: the seed offset of the synthetic images' draws (starting views, mixing weights, target classes), so they never
#: repeat the training run's own draws
SYNTH_SEED = 20_011


def synth_cache_dir() -> Path | None:
    """Where synthetic images are kept between runs (``$GRAFTKD_CACHE/synthetic``); None keeps none."""
    from graftkd.data.cache import cache_dir

    return cache_dir() / "synthetic"


def _state_sha256(model: nn.Module) -> str:
    """sha256 of a model's parameters and buffers, persistent or not (names, dtypes, shapes and bytes)."""
    import hashlib
    from itertools import chain

    digest = hashlib.sha256()
    for name, tensor in chain(model.named_parameters(), model.named_buffers()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def synthetic_images(teacher: LoadedModel, images: torch.Tensor, norm: nn.Module, config: GraftConfig, recipe: Recipe,
                     device: torch.device, out_dir: Path | None, progress: bool,
                     num_classes: int) -> tuple[torch.Tensor, dict | None]:
    """The training images: the few-shot ``images``, followed by ``recipe.synth`` images inverted from the teacher's
    BatchNorm statistics (``graftkd.engine.inversion``), or ``images`` alone when ``recipe.synth`` is 0 or None.

    The synthetic images are made once: saved under the run folder with what made them, and read back when a
    resumed run asks for the same (so a resume is bit-identical and does not pay for them twice). They are also kept
    in the cache (``synth_cache_dir``, unless ``recipe.synth_cache`` is False), keyed by everything that decides
    them bit for bit: the teacher's state, the images, the settings and seed, the precision, device type, thread
    count, torch version and the inversion code. Another run with the same key (another student, loss or budget
    from the same teacher and images) reads them instead of spending minutes on them; ``record["reused"]`` says so.
    The label-free estimate, the repair and the BatchNorm start keep to the real images; the greedy unit choice
    sees the first ``--synth-choice`` of them too."""
    import hashlib
    import inspect
    import warnings

    from graftkd.engine import inversion
    from graftkd.engine.checkpoint import fingerprint
    from graftkd.engine.runtime import resolve_precision
    from graftkd.files import atomic_torch_save

    count = recipe.synth or 0
    if count == 0:
        return images, None
    spec = inversion.Inversion(count, steps=recipe.synth_steps)
    precision = resolve_precision(device, config.precision, cpu_bf16=True)
    key = {**spec.to_dict(), "seed": int(config.seed) + SYNTH_SEED,
           "images": hashlib.sha256(images.cpu().contiguous().numpy().tobytes()).hexdigest(),
           "teacher": _state_sha256(teacher.model), "normalize": _state_sha256(norm), "classes": int(num_classes),
           "precision": precision, "device": device.type, "threads": torch.get_num_threads(),
           "torch": str(torch.__version__), "code": hashlib.sha256(inspect.getsource(inversion).encode()).hexdigest()}
    path = out_dir / "synthetic.pt" if out_dir is not None else None
    folder = synth_cache_dir() if recipe.synth_cache else None
    kept = folder / f"{fingerprint(key)}.pt" if folder else None
    for source, label in ((path, str(path.name) if path else ""), (kept, "cache")):
        if source is None or not source.exists():
            continue
        try:
            saved = torch.load(source, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a torn or foreign file costs a remake, not the run
            warnings.warn(f"ignoring unreadable synthetic images {source} ({type(exc).__name__}); making them again",
                          stacklevel=2)
            continue
        if not isinstance(saved, dict) or saved.get("key") != key:  # another run's, or not ours
            continue
        made = saved["images"]
        if source is kept and path is not None:  # the run folder keeps its own copy: a resume needs no cache
            saved = {**saved, "record": {**saved["record"], "from_cache": True}}  # made by another run: free here
            atomic_torch_save(path, saved)
        if progress:
            maker = "an earlier run" if source is kept or saved["record"].get("from_cache") else \
                "this run before it stopped"
            print(f"synthetic images: {count} read from {source} (made in {saved['record']['seconds']:.0f} s by "
                  f"{maker})", flush=True)
        reused = {"reused": label, **({"cache_file": str(kept)} if source is kept else {})}
        return torch.cat([images, made.to(device)]), {**saved["record"], **reused}
    say = (lambda text: print(text, flush=True)) if progress else None
    if say:
        say(f"synthetic images: {count} from {len(images)} few-shot images, {spec.steps} steps per batch of "
            f"{spec.batch_size} ({precision})")
    made, record = inversion.invert_batchnorm(teacher.model.to(device), norm.to(device), images, spec,
                                              generator=torch.Generator().manual_seed(key["seed"]),
                                              num_classes=num_classes,
                                              precision=torch.bfloat16 if precision == "bf16" else None, report=say)
    record = {**record, "seed": key["seed"], "precision": precision}
    payload = {"key": key, "images": made.cpu(), "record": record}
    if path is not None:
        atomic_torch_save(path, payload)
    if kept is not None:
        try:
            atomic_torch_save(kept, payload)
        except OSError as exc:
            warnings.warn(f"could not keep the synthetic images in {kept} ({exc}); set GRAFTKD_CACHE to a writable "
                          "folder, or pass --no-synth-cache", stacklevel=2)
    return torch.cat([images, made.to(device)]), record


def fadable(record) -> bool:
    """True when the whole student came from the teacher in one piece, by choosing units or channels (no block
    fresh): the start of a fading run is then the whole teacher."""
    return (record.whole and not record.fresh_blocks
            and ((record.depth is not None and bool(record.depth.selections))
                 or (record.width is not None and bool(record.width.narrowed()))))


def units_chosen_only(record) -> bool:
    """True when the whole student came from the teacher by choosing units (no channel chosen, no block fresh)."""
    return (record.whole and record.depth is not None and bool(record.depth.selections)
            and not record.fresh_blocks and not any("channels" in row["status"] for row in record.blocks))


#: the share of the budget over which a depth derivation's dropped units fade out when the user chose nothing
FADE = 0.25


#: the repaired student's label-free agreement (%) from which training it on the few images is left out
REPAIRED_ENOUGH = 95.0

#: the KD temperature of the default path for derived students (the loss's own default is Hinton's 4): hotter
#: targets carry more of the teacher's logits than its top class, which is what a student seeing a few images
#: lacks. Validation split (results/cifar10-derived/dev-amx): ResNet-56 -> ResNet-20, fading and greedy units, 128k
#: samples, K=1 78.6 / 77.9 % against 75.0 / 76.0 at 4 (seeds 0 / 1), K=10 84.4 / 83.7 against 82.2 / 83.0 (8 and
#: 32 in NOTES.md); VGG16-BN -> half width, fading with feature maps, 64k samples, K=1 89.4 against 88.2, K=10 91.6
#: against 90.4 (seed 0)
HOT_TEMPERATURE = 16.0

#: synthetic training images on the default path after a depth derivation, and after a width derivation that
#: trains (``WIDTH_SYNTH_BUDGET``), made by ``graftkd.engine.inversion``: mixed
#: few-shot views moved towards the teacher's BatchNorm statistics. Validation split (results/cifar10-derived/dev-amx,
#: benchmarks/derived/synth_probe.py), ResNet-56 -> ResNet-20 on the default path at 128k samples, seed 0: with 1,000
#: of them (100 steps per batch) 89.3 against 84.4 % at K=10 and 86.3 against 78.6 at K=1; with 50 steps, 86.3 at K=10
SYNTH = 1000

#: the sample budget of the default path with synthetic images, when ``--samples`` is not given: making 1,000 images
#: costs about as long as training on 250k samples, so the training budget is halved to keep a K=10 run near 10
#: minutes on 2 CPU cores; the validation runs above trained on 128k
SYNTH_BUDGET = 128_000

#: the sample budget of the default path for a width derivation with synthetic images, when ``--samples`` is not
#: given (used when the repaired student fails the check, so that the whole teacher trains while its dropped
#: channels fade out). Validation split (results/cifar10-derived/dev-amx), VGG16-BN -> half width, KD plus feature
#: maps at temperature 16, fading, 64k samples, seed 0: with 1,000 images 91.2 against 89.4 % at K=1 and 93.1
#: against 91.6 at K=10. Making them from a VGG16 costs about as long as training on those 64k samples (1,317 s
#: against about 1,250 s on a 2-core AVX2 EPYC in fp32), so the run costs about what 128k samples without them
#: would, half the 256k of the default before them; on test
#: (row default-fade-64k-t16-synth1000) K=1 87.92 +- 0.11 % (n=3) against 86.92 +- 0.21 at 256k without them
WIDTH_SYNTH_BUDGET = 64_000

#: at most one synthetic image per this many training samples of a budget the user gave (``--samples``), so that a
#: short run stays short (making an image costs about as much as training a ResNet-20 on 250 samples, a half-width
#: VGG on 64): 1,000 from a 128k budget up. The paths' own budgets come with their own count, ``SYNTH``
SYNTH_SAMPLES_PER_IMAGE = 128


#: on the default path with synthetic images, the greedy units are chosen on the few-shot images plus this many of
#: the synthetic ones (``--synth-choice``). Validation split (results/cifar10-derived/dev-amx), ResNet-56 ->
#: ResNet-20, 1,000 images, 128k samples, K=10 seed 0: 88.6 against 86.9 % with the units chosen on the 100 real
#: images (far agreement 66.3 against 54.5 %); the probe whose choice saw all 1,000 gave 89.3 at K=10, and 86.3
#: against 86.0 at K=1. 256 keeps the rule's cost near that of 100 real images with trials replayed. On test (row
#: default-synth-choice): K=10 84.80 +- 0.68 against 84.28 +- 0.71 % (seeds 0-2, -0.27 / +1.01 / +0.82 per seed);
#: K=1 83.64 +- 0.15 against 83.52 +- 0.06 (seeds 0-2, +0.11 / +0.05 / +0.22): the same within noise
SYNTH_CHOICE = 256


def resolve_refinement(record) -> dict:
    """What a derived student gets when the user chose nothing (``refine`` 'auto'), and why.

    The rule comes from the validation split (``results/cifar10-derived/dev``, never test):
    - only units chosen (a depth derivation): patient KD on logits, no repair. Repair then KD gave 72.9 % against
      75.5 %; KD plus the stage outputs (with fading, 128k) 73.0 against 72.0 at K=1 and 83.8 against 83.8 at K=10,
      at 1.4x the time (the cheaper KD). The student starts as the whole teacher
      and the dropped units fade out over the first ``FADE`` of the budget (``results/cifar10-derived/dev-amx``:
      at 128k samples 83.8 against 81.6 % at K=10, 72.0 against 66.0 % at K=1);
    - channels chosen, the whole model derived at once: the closed-form repair first. If the repaired student
      agrees with the teacher on at least ``REPAIRED_ENOUGH`` % of the held-out views it is not trained
      (vgg16-graft: repair alone 96.7 %, KD after it 95.1-95.8 %); otherwise the repaired weights are set aside,
      and patient KD plus feature maps trains the whole teacher while the dropped channels fade out over the first
      ``fade_below`` of the budget (half-width VGG on validation at 64k: 88.2 against 86.0 % for KD plus feature
      maps after the repair at K=1, 90.4 against 90.3 at K=10; on test 86.99 against 86.55 at K=10, n=3), on the
      few-shot images plus ``SYNTH`` synthetic ones at ``WIDTH_SYNTH_BUDGET`` samples (made only when it trains);
    - any block fresh: patient KD (the fresh blocks must be trained, and the repair needs one whole derivation).
    Derived students train at the KD temperature ``HOT_TEMPERATURE``; students with fresh blocks keep the loss's own.
    ``stop_at`` is the agreement threshold to check after the repair (None: no check); ``fade`` the share of the
    budget over which dropped units fade out (0: cut before the first step); ``fade_below`` the fade that replaces
    the repaired start when the check fails."""
    statuses = [row["status"] for row in record.blocks]
    fresh = [row["block"] for row in record.blocks if row["status"] == "fresh"]
    if fresh:
        return {"repair": False, "loss": "kd", "refine": "kd", "stop_at": None, "fade": 0.0,
                "why": (f"blocks {', '.join(map(str, fresh))} are fresh: patient KD trains them" if len(fresh) > 1
                        else f"block {fresh[0]} is fresh: patient KD trains it")}
    if any("channels" in status for status in statuses) and record.whole:
        return {"repair": True, "loss": "feature_kd", "refine": "kd", "stop_at": REPAIRED_ENOUGH, "fade": 0.0,
                "fade_below": FADE, "loss_options": {"temperature": HOT_TEMPERATURE}, "synth": SYNTH,
                "synth_budget": WIDTH_SYNTH_BUDGET, "why": "channels chosen: the closed-form repair first"}
    if units_chosen_only(record):
        return {"repair": False, "loss": "kd", "refine": "kd", "stop_at": None, "fade": FADE, "synth": SYNTH,
                "synth_choice": SYNTH_CHOICE,
                "loss_options": {"temperature": HOT_TEMPERATURE},
                "why": f"units chosen: patient KD at temperature {HOT_TEMPERATURE:g} from the whole teacher, the dropped "
                       f"units fading out over the first {FADE:g} of the budget"}
    return {"repair": False, "loss": "kd", "refine": "kd", "stop_at": None, "fade": 0.0,
            "why": "units chosen" if any("units" in status for status in statuses) else "every block inherited"}


def _feature_channels(student: nn.Module, record) -> dict[str, torch.Tensor]:
    """Feature path -> teacher channels the derived student keeps there (its last conv/linear's choice)."""
    if not record.whole or record.width is None or not hasattr(student, "feature_paths"):
        return {}
    layers = {la.path: la for la in record.width.layers}
    order = [n for n, _ in student.named_modules()]
    writers = [n for n in order if n in layers]
    select = {}
    for path in student.feature_paths():
        # the last conv/linear at or before the end of the module at ``path`` writes its output channels
        end = max(i for i, n in enumerate(order) if n == path or n.startswith(f"{path}.")) if path else len(order) - 1
        before = [n for n in writers if order.index(n) <= end]
        layer = layers[before[-1]] if before else None
        if layer is not None and len(layer.out_keep) < layer.teacher_out:
            select[path] = layer.out_keep
    return select


def unit_pairs(record) -> list[tuple[str, str]]:
    """(student unit, teacher unit) feature spots after a depth derivation: student unit j of a container that
    took teacher units i_0 < i_1 < ... stands for teacher units i_j .. i_{j+1} - 1, so its output should be the
    teacher's stream after unit i_{j+1} - 1 (after the container's last unit, for the last one)."""
    if not record.whole or record.depth is None:
        return []
    pairs = []
    for path, chosen in record.depth.selections.items():
        teacher_path = record.depth.teacher_path(path)
        ends = [nxt - 1 for nxt in chosen[1:]] + [record.depth.lengths[path] - 1]
        for j, end in enumerate(ends):
            pairs.append((f"{path}.{j}" if path else str(j), f"{teacher_path}.{end}" if teacher_path else str(end)))
    return pairs


@torch.no_grad()
def _bn_start(teacher: nn.Module, student: nn.Module, record, inputs: torch.Tensor, rule: str) -> dict:
    """BatchNorm statistics of the derived student before any step.

    ``teacher`` keeps the teacher's; ``reestimate`` measures them on the few-shot images; ``auto`` keeps
    whichever gives the smaller few-shot logit error against the teacher (label-free). Dropped units shift
    the residual stream that later norms see, so depth derivations usually need re-estimation, while
    narrowed layers keep the teacher's (results/cifar10-vgg16-graft/NOTES.md).
    """
    from graftkd.derive.depth import logit_error_fn
    from graftkd.engine.bn import reestimate_batchnorm

    error = logit_error_fn(teacher, inputs)
    kept = {k: v.clone() for k, v in student.state_dict().items()}
    before = error(student)
    if rule == "teacher":
        return {"rule": rule, "used": "teacher", "logit_rel_error_teacher_stats": before}
    reestimate_batchnorm(student, [inputs])
    after = error(student)
    used = "reestimate" if rule == "reestimate" or after < before else "teacher"
    if used == "teacher":
        student.load_state_dict(kept)
    return {"rule": rule, "used": used, "logit_rel_error_teacher_stats": before,
            "logit_rel_error_reestimated": after}


@dataclass
class _Refined:
    student: nn.Module
    shots: int
    seconds: float


def few_shot_task(teacher: LoadedModel, student: nn.Module, images: torch.Tensor, norm: nn.Module,
                   config: GraftConfig, device: torch.device, out_dir: Path | None, progress: bool, world, *,
                   recipe: Recipe | None, **budget):
    """The one place a ``distill`` run's FewShotTask is built: what the config says (seed, augmentation,
    precision, checkpoints) plus the path's own budget (batch size, epochs, rate, inheritance, ...)."""
    from graftkd.distill.base import FewShotTask
    from graftkd.graft.api import augmenter

    return FewShotTask(
        teacher=teacher.model.to(device).eval(), student=student.to(device), images=images, normalize=norm.to(device),
        device=device, generator=seed_everything(config.seed), augment=augmenter(config), precision=config.precision,
        compile=config.compile,
        teacher_arch=teacher.arch, run_dir=out_dir, checkpoint_every_s=config.checkpoint_every_s,
        log_every=1 if recipe is not None else config.log_every, progress=progress, seed=config.seed,
        padding=config.padding, flip=config.flip, recipe=recipe, world=world, **budget)


def run_method(name: str, teacher: LoadedModel, student: nn.Module, student_arch: str, fewshot, norm: nn.Module,
                config: GraftConfig, device: torch.device, out_dir: Path | None, progress: bool,
                recipe: Recipe | None = None, world=None, options: dict | None = None):
    """A registered few-shot method on ``student`` with a grid cell's budget (``recipe``: the patient recipe's
    sample budget instead, for methods that train in the shared loop); returns the result and its facts.
    ``options``: the method's own (``--method-option KEY=VALUE``)."""
    from graftkd.distill.base import build_method, check_recipe
    from graftkd.graft.schedule import batch_size_for, paper_budget

    runner = build_method(name, options)
    if recipe is not None and recipe.synth is None:  # synthetic images are the derived default path's choice only
        recipe = with_changes(recipe, synth=0)
    images = fewshot.images.to(device)
    num_classes = num_outputs(teacher.model, images.shape[1:])
    shots = config.shots or max(1, len(images) // num_classes)
    batch_size = config.batch_size or batch_size_for(shots, len(images))
    if recipe is not None:
        check_recipe(runner)
        epochs, lr, batch_size = recipe.chunks, recipe.lr, recipe.batch_size
    else:
        epochs, lr = paper_budget(teacher.model, student, tuple(images.shape[1:]), config.schedule, batch_size,
                                  config.inherit)
    synth = None
    if recipe is not None:
        images, synth = synthetic_images(teacher, images, norm, config, recipe, device, out_dir, progress, num_classes)
    task = few_shot_task(teacher, student, images, norm, config, device, out_dir, progress, world,
                          batch_size=batch_size, epochs=epochs, lr=lr, shots=shots, num_classes=num_classes,
                          recipe=recipe, inherit=config.inherit, student_arch=student_arch, mixup=config.mixup,
                          schedule=config.schedule)
    started = time.perf_counter()
    outcome = runner.run(task)
    facts = {"method": name, "method_options": runner.options,
             "budget": {"epochs": epochs, "batch_size": batch_size, "lr": lr},
             "recipe": recipe.to_dict() if recipe is not None else {"name": "paper"},
             "refine": {"stages": outcome.stages, **outcome.extra}, "synth": synth}
    return _Refined(outcome.student.eval(), shots, time.perf_counter() - started), facts


def derived_adapters(plan, record) -> None:
    """Adapters start as the derivation's channel choice at every cut (He init where a side is fresh).

    Block l's last conv/linear says which teacher channels its output holds (adapter out), block l+1's
    first one which teacher channels it reads (adapter in); derived whole, the two agree and the pair is
    the identity, so the grafted chain starts as the derived student.
    """
    model_paths = {id(m): n for n, m in plan.student.named_modules()}

    def keep(index: int, first: bool):
        if index not in record.derived_blocks:
            return None
        block = plan.student_blocks[index]
        layers = [(n, m) for n, m in block.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        if not layers:
            return None
        view_path, module = layers[0] if first else layers[-1]
        path = model_paths[id(module)] if record.whole else view_path  # per-block plans speak in view paths
        return record.input_channels(index, path) if first else record.output_channels(index, path)

    for cut in plan.adapter_cuts:
        out_keep, in_keep = keep(cut, first=False), keep(cut + 1, first=True)
        if out_keep is not None:
            plan.scions[cut].adapter_out.set_channel_selection(out_keep)
        if in_keep is not None:
            plan.scions[cut + 1].adapter_in.set_channel_selection(in_keep)


def label_free_estimate(student: nn.Module, teacher: nn.Module, images: torch.Tensor, norm: nn.Module, config: GraftConfig,
                device: torch.device, mixed: bool, far: bool = False) -> dict:
    """Top-1 agreement and KL on a held-out pool of augmented views (its own seed, never trained on); with ``far``,
    the same on a pool of far views under the key "far" (`graftkd.engine.agreement.far_pool`)."""
    from graftkd.engine.agreement import FAR_SEED, POOL_SEED, agreement, agreement_pool, far_pool
    from graftkd.graft.api import augmenter

    images, norm, student, teacher = images.to(device), norm.to(device), student.to(device), teacher.to(device)
    near = agreement_pool(images, norm, augmenter(config), mixed=mixed, seed=POOL_SEED)
    estimate = {**agreement(student, teacher, near), "seed": POOL_SEED}
    if far:
        estimate["far"] = {**agreement(student, teacher, far_pool(images, norm, seed=FAR_SEED)), "seed": FAR_SEED}
    return estimate
