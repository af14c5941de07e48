"""Audit a training step: which modules it ran, how often, and every point where it waits for the device.

Why: "no repeated teacher prefix" and "no per-step host synchronisation" are claims about what the code
does, so they are checked by observing it, not by reading it. Module calls are counted with forward
hooks; device-to-host reads are caught below autograd with a ``TorchDispatchMode``, which sees the aten
ops of forward *and* backward: ``_local_scalar_dense`` (``.item()``, ``float(t)``, ``if t:``), ops whose
output size depends on data (``nonzero``, ``masked_select``, ``unique``), and copies from an accelerator
to the CPU. Reads of tensors that live on the CPU anyway (Adam's step counters; every tensor in a CPU
run) are recorded separately: they are not device syncs on any hardware, but a CPU-only test can still
assert the model's own tensors are never read back.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR_READS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal"}
_DATA_DEPENDENT = {"aten::nonzero", "aten::masked_select", "aten::unique", "aten::_unique", "aten::_unique2",
                   "aten::unique_consecutive", "aten::unique_dim"}


def _tensors(values) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(_tensors(value))
    return found


class _SyncWatch(TorchDispatchMode):
    def __init__(self, audit: "StepAudit") -> None:
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name() if hasattr(func, "name") else str(func)
        name = name if name.startswith("aten::") else f"aten::{name.split('.')[0]}"
        op = name.split(".")[0]
        if op in _SCALAR_READS or op in _DATA_DEPENDENT:
            self.audit._record_read(op, _tensors(args))
        elif op == "aten::_to_copy":
            source = _tensors(args[:1])
            target = kwargs.get("device")
            if source and target is not None and source[0].device.type != "cpu" and torch.device(target).type == "cpu":
                self.audit.syncs[op] += 1
        return func(*args, **kwargs)


class StepAudit:
    """Context manager: ``modules`` calls counted by name; host reads split into model vs allowed tensors.

    ``allowed`` are tensors whose reads are expected (e.g. optimiser step counters, which PyTorch keeps on
    the CPU); after the block, ``syncs`` counts reads that would stall an accelerator and ``model_reads``
    counts scalar reads of any other tensor, CPU or not.
    """

    def __init__(self, modules: dict[str, nn.Module], allowed: Iterable[torch.Tensor] = ()) -> None:
        self.modules = modules
        self.allowed_ptrs = {t.data_ptr() for t in allowed}
        self.calls: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.model_reads: Counter[str] = Counter()
        self.allowed_reads: Counter[str] = Counter()
        self._handles: list = []
        self._mode: _SyncWatch | None = None

    def _record_read(self, op: str, tensors: list[torch.Tensor]) -> None:
        if tensors and all(t.data_ptr() in self.allowed_ptrs for t in tensors):
            self.allowed_reads[op] += 1
            return
        self.model_reads[op] += 1
        if any(t.device.type != "cpu" for t in tensors):
            self.syncs[op] += 1

    def __enter__(self) -> "StepAudit":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(lambda *_, n=name: self.calls.update([n])))
        self._mode = _SyncWatch(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def optimizer_step_counters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The per-parameter ``step`` tensors PyTorch optimisers keep (on the CPU unless capturable/fused)."""
    return [state["step"] for state in optimizer.state.values() if isinstance(state.get("step"), torch.Tensor)]
