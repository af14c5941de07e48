"""FSKD (Li et al., CVPR 2020): prune the teacher, then fix each layer in closed form on a few images.

The student is the teacher with filters removed (L1-norm selection, Li et al. 2017) down to the widths
of the requested zoo student, which must therefore have the teacher's layers (same graph, fewer
channels): vgg16_bn -> vgg16_graft_bn / vgg16_half_bn, vgg16 -> vgg16_graft / vgg16_half,
digits_cnn -> digits_cnn_half. Then, in network order, every Conv2d/Linear whose input is changed by
the pruning gets a C×C map Q on its output (a 1×1 conv), fitted so that the student's output there
(fed by the already corrected earlier layers) matches the teacher's output at the kept channels, and Q
is folded into the layer (W <- Q·W, b <- Q·b). The result is the plain student architecture.

Design choices (all closed form: no labels, no SGD, the epoch budget is not used):

- Layers are matched *before* any BatchNorm, i.e. at the conv's own output. The pruned student keeps
  the teacher's BatchNorm parameters and statistics for the kept channels, so equal pre-BN outputs
  mean equal post-BN outputs; per output channel the least-squares solution is the same either way.
- Least squares via the normal equations accumulated in float64 over all pixels of all images, with a
  ridge that shrinks Q towards the identity (no correction) rather than towards 0:
  (G + λI) Qᵀ = B + λI, λ = ``ridge``·tr(G)/C, solved by Cholesky; the ridge keeps dead ReLU channels
  and layers with fewer rows than channels (a Linear on a few hundred images) well-posed, and leaves Q
  the identity in directions the images never reach. ``ridge=0`` is plain least squares (a singular
  G then gets the minimum-norm solution: gelsd on CPU, a pseudo-inverse on GPU).
- Q has no bias, as in the paper.
- Rows are the few-shot images (normalised, no augmentation); ``copies`` > 0 adds that many
  augmented copies (``task.augment`` with ``task.generator``) for more rows.
- Every fold is checked numerically on a probe batch; a mismatch is a bug and raises.
- Runs in fp32 whatever ``task.precision`` says: a closed-form fit needs the accuracy.
"""
from __future__ import annotations

import time

import torch

from graftkd.derive.repair import (
    _collect,
    _fold_and_check,
    _relative_logit_error,
    _residual,
    solve_correction,
)
from graftkd.distill.base import FewShotMethod, FewShotTask, MethodOutcome, register_method
from graftkd.distill.fewshot.fskd_pruning import _Layer, load_pruned, prune_plan
from graftkd.errors import GraftkdError

__all__ = ["FSKD", "prune_plan", "load_pruned", "solve_correction"]


@register_method("fskd")
class FSKD(FewShotMethod):
    # correct=False stops after pruning: the L1-pruned teacher alone, as a reference point for ablations.
    defaults = {"ridge": 1e-4, "copies": 0, "fit_linear": True, "correct": True}
    own_student = True

    def run(self, task: FewShotTask) -> MethodOutcome:
        return self.fit(task)[0]

    def fit(self, task: FewShotTask) -> tuple[MethodOutcome, list[_Layer]]:
        """Prune (and correct) ``task.student`` in place; also return the pruning plan, for callers that
        continue from this student (``graft_fskd``)."""
        start = time.perf_counter()
        ridge = float(self.options["ridge"])
        if ridge < 0:
            raise GraftkdError(f"fskd option ridge must be >= 0, got {ridge}")
        teacher, student = task.teacher, task.student
        teacher.eval()
        student.eval()
        layers, norms = prune_plan(teacher, student, tuple(task.images.shape[1:]),
                                   teacher_name=task.teacher_arch, student_name=task.student_arch)
        load_pruned(teacher, student, layers, norms)
        inputs = self._inputs(task)
        chunk = max(int(task.batch_size), 1)
        logit_before = _relative_logit_error(teacher, student, inputs, chunk)

        records: list[dict] = []
        from tqdm.auto import tqdm

        for layer in tqdm(layers, desc="fskd: least squares per layer", unit="layer", disable=not task.progress,
                          leave=False):
            if not self.options["correct"] or not layer.affected or (
                    layer.kind == "linear" and not self.options["fit_linear"]):
                continue
            fit_start = time.perf_counter()
            stats = _collect(teacher, student, layer, inputs, chunk)
            q = solve_correction(stats["gram"], stats["cross"], ridge)
            after = _residual(q, stats)
            fold_error = _fold_and_check(student.get_submodule(layer.path), q, stats["probe"])
            records.append({
                "layer": layer.path, "kind": layer.kind, "channels": [len(layer.out_keep), layer.teacher_out],
                "rows": int(stats["rows"]), "rel_error_before": stats["before"] / stats["target"],
                "rel_error_after": after / stats["target"], "fold_max_abs_diff": fold_error,
                "seconds": time.perf_counter() - fit_start,
            })
        logit_after = _relative_logit_error(teacher, student, inputs, chunk) if records else logit_before
        seconds = time.perf_counter() - start
        student.eval()
        pruned = [{"layer": la.path, "kept": len(la.out_keep), "of": la.teacher_out}
                  for la in layers if len(la.out_keep) < la.teacher_out]
        stage = {"name": "fskd", "kind": "fskd", "epochs": 0, "steps": 0, "solves": len(records),
                 "images": int(len(inputs)), "seconds": seconds, "final_loss": logit_after, "loss_curve": []}
        extra = {"arch": task.student_arch or type(student).__name__, "pruned_layers": pruned, "layers": records,
                 "logit_rel_error_pruned": logit_before, "logit_rel_error_corrected": logit_after,
                 "solver": "normal equations, float64, ridge towards identity, Cholesky",
                 "ridge": ridge, "rows_images": int(len(inputs)), "seconds": seconds}
        return MethodOutcome(student=student, stages=[stage], extra=extra), layers

    def _inputs(self, task: FewShotTask) -> torch.Tensor:
        """Normalised few-shot images, plus ``copies`` augmented copies when asked."""
        copies = int(self.options["copies"])
        if copies < 0:
            raise GraftkdError(f"fskd option copies must be >= 0, got {copies}")
        if copies and task.augment is None:
            raise GraftkdError("fskd option copies needs augmentation: enable it or set copies=0")
        with torch.no_grad():
            batches = [task.normalize(task.images)]
            for _ in range(copies):
                batches.append(task.normalize(task.augment(task.images, task.generator)))
        return torch.cat(batches).float()


# ---------------------------------------------------------------------------------------- pruning
