"""Closed-form repair: least-squares 1×1 corrections folded into a derived student's layers (FSKD, generalised).

In network order, every Conv2d/Linear whose input differs from the teacher's gets a C×C map Q on its
output, fitted so that the student's output there (fed by the already corrected earlier layers) matches
the teacher's output at the kept channels; Q is folded into the layer (W <- Q·W, b <- Q·b). After a depth
derivation the teacher's output is taken where the teacher computes the same layer (``layer2.1.conv1``
of ResNet-20 is ``layer2.4.conv1`` of ResNet-56). See :mod:`graftkd.distill.fewshot.fskd` for the solver's
design choices (float64 normal equations, ridge towards the identity, every fold checked).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from graftkd.errors import GraftkdError


@torch.no_grad()
def repair(teacher: nn.Module, student: nn.Module, derivation, inputs: torch.Tensor, *, ridge: float = 1e-4,
           chunk: int = 128, progress: bool = False) -> dict:
    """Fit and fold the corrections for a whole-model derivation; returns the record for ``result.json``."""
    if not derivation.whole or derivation.width is None:
        return {"applied": False, "why": "the student was derived block by block: repair needs one whole derivation"}
    started = time.perf_counter()
    teacher.eval()
    student.eval()
    before = _relative_logit_error(teacher, student, inputs, chunk)
    changed = False
    layers = []
    from tqdm.auto import tqdm

    for layer in tqdm(derivation.width.layers, desc="repair: least squares per layer", unit="layer",
                      disable=not progress, leave=False):
        t_path = derivation.depth.teacher_path(layer.path) if derivation.depth is not None else layer.path
        changed = changed or layer.affected or t_path != layer.path
        if not changed:
            continue  # everything before the first change already equals the teacher
        if layer.kind in ("depthwise", "grouped"):
            continue  # a 1x1 correction mixes channels across groups, which these cannot hold: the next layer's does
        stats = _collect(teacher, student, layer, inputs, chunk, teacher_path=t_path)
        q = solve_correction(stats["gram"], stats["cross"], ridge)
        after = _residual(q, stats)
        _fold_and_check(student.get_submodule(layer.path), q, stats["probe"])
        layers.append({"layer": layer.path, "teacher_layer": t_path, "rel_error_before": stats["before"] / stats["target"],
                       "rel_error_after": after / stats["target"]})
    return {"applied": True, "ridge": ridge, "layers": len(layers), "logit_rel_error_before": before,
            "logit_rel_error_after": _relative_logit_error(teacher, student, inputs, chunk),
            "seconds": time.perf_counter() - started, "per_layer": layers}


# --------------------------------------------------------------------------------- least squares
class _Stop(Exception):
    """Raised from a forward hook: the rest of the network is not needed for this layer."""


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N·H·W, C); (N, C) unchanged; float64 for the normal equations."""
    if x.dim() == 4:
        x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x.double()


def _output_of(model: nn.Module, path: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of the module at ``path`` on ``x``, without running the layers after it."""
    seen: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        seen["in"], seen["out"] = args[0].detach(), output.detach()
        raise _Stop

    handle = model.get_submodule(path).register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "out" not in seen:
        raise GraftkdError(f"fskd: layer '{path}' was not reached by the forward pass")
    return seen["in"], seen["out"]


@torch.no_grad()
def _collect(teacher: nn.Module, student: nn.Module, layer, inputs: torch.Tensor, chunk: int,
             teacher_path: str | None = None) -> dict:
    """Normal-equation sums G = ZsᵀZs, B = ZsᵀZt and the error sums for one layer, over all images.

    ``layer`` has ``path`` (in the student) and ``out_keep`` (teacher channels it keeps); ``teacher_path``
    is where the teacher computes the same layer (default: the same path; another one after a depth
    derivation took units out)."""
    width = len(layer.out_keep)
    device = inputs.device
    gram = torch.zeros((width, width), dtype=torch.float64, device=device)
    cross = torch.zeros_like(gram)
    target = torch.zeros((), dtype=torch.float64, device=device)
    before = torch.zeros_like(target)
    rows, probe = 0, None
    out_keep = layer.out_keep.to(device)
    for x in inputs.split(chunk):
        _, t_out = _output_of(teacher, teacher_path or layer.path, x)
        s_in, s_out = _output_of(student, layer.path, x)
        zt, zs = _rows(t_out.index_select(1, out_keep)), _rows(s_out)
        gram += zs.T @ zs
        cross += zs.T @ zt
        target += (zt * zt).sum()
        before += ((zs - zt) ** 2).sum()
        rows += zt.shape[0]
        if probe is None:
            probe = s_in[:8]
    return {"gram": gram, "cross": cross, "target": float(target) or 1.0, "before": float(before),
            "rows": rows, "probe": probe}


def solve_correction(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """Q minimising ‖Zs·Qᵀ − Zt‖² + λ‖Q − I‖² (λ = ridge·tr(G)/C), from G = ZsᵀZs and B = ZsᵀZt."""
    width = gram.shape[0]
    eye = torch.eye(width, dtype=torch.float64, device=gram.device)
    trace = float(torch.trace(gram))
    if trace <= 0.0:  # the layer's output is zero on every image: nothing to correct
        return eye
    lam = ridge * trace / max(width, 1)
    matrix, rhs = gram + lam * eye, cross + lam * eye
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        solution = torch.cholesky_solve(rhs, factor)  # = Qᵀ
    elif matrix.device.type == "cpu":  # singular (dead channels, ridge 0): minimum-norm solution
        solution = torch.linalg.lstsq(matrix, rhs, driver="gelsd").solution
    else:
        solution = torch.linalg.pinv(matrix, hermitian=True) @ rhs
    return solution.T.contiguous()


def _residual(q: torch.Tensor, stats: dict) -> float:
    """‖Zs·Qᵀ − Zt‖² from the sums: tr(Q G Qᵀ) − 2 tr(Q B) + ‖Zt‖²."""
    value = torch.trace(q @ stats["gram"] @ q.T) - 2 * torch.trace(q @ stats["cross"]) + stats["target"]
    return max(float(value), 0.0)


@torch.no_grad()
def fold_correction(layer: nn.Module, q: torch.Tensor) -> None:
    """W <- Q·W and b <- Q·b in place: the layer then computes Q·(its old output) exactly."""
    q = q.to(device=layer.weight.device, dtype=torch.float64)
    weight = layer.weight.double()
    folded = torch.einsum("po,o...->p...", q, weight)
    layer.weight.copy_(folded.to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.copy_((q @ layer.bias.double()).to(layer.bias.dtype))


@torch.no_grad()
def _fold_and_check(layer: nn.Module, q: torch.Tensor, probe: torch.Tensor) -> float:
    """Fold Q and compare the folded layer with Q applied after the old layer on a probe batch."""
    old = layer(probe).double()
    expected = torch.einsum("po,no...->np...", q, old)
    fold_correction(layer, q)
    difference = float((layer(probe).double() - expected).abs().max())
    scale = float(expected.abs().max())
    if not difference <= 1e-4 * max(1.0, scale):
        raise GraftkdError(
            f"fskd: the folded layer differs from layer+Q by {difference:.2e} (scale {scale:.2e}); this is a "
            "bug in the fold, please report it with the model names"
        )
    return difference


@torch.no_grad()
def _relative_logit_error(teacher: nn.Module, student: nn.Module, inputs: torch.Tensor, chunk: int) -> float:
    """‖S(x) − T(x)‖² / ‖T(x)‖² over the fitting images."""
    error = reference = 0.0
    for x in inputs.split(chunk):
        t, s = teacher(x).double(), student(x).double()
        error += float(((s - t) ** 2).sum())
        reference += float((t * t).sum())
    return error / (reference or 1.0)
