"""Contrastive representation distillation (Tian et al. 2020), with a bounded MoCo-style queue.

Student and teacher embeddings (trainable Linear + L2 norm, 128-d) of the same sample are a positive
pair; past embeddings of the other net, kept in a FIFO queue, are the negatives; the loss is a
symmetric InfoNCE at temperature 0.07 (weight 0.8). The queue replaces CRD's dataset-sized memory bank.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from graftkd.distill.zoo._layers import flat, flat_dim, float32_math
from graftkd.distill.zoo.base import Distiller, Shape, register_distiller
from graftkd.errors import GraftkdError


class EmbeddingQueue(nn.Module):
    """Two FIFO queues (student, teacher) of detached, normalised embeddings; no parameters.

    ``ptr`` is the next slot to write, ``filled`` how many slots hold an embedding (at most ``size``).
    Updates are index arithmetic on tensors: nothing is read on the host.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("student", torch.zeros(size, dim))
        self.register_buffer("teacher", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, e_s: torch.Tensor, e_t: torch.Tensor) -> None:
        size = self.student.shape[0]
        e_s, e_t = e_s[-size:], e_t[-size:]  # a batch larger than the queue keeps its last samples
        n = e_s.shape[0]
        slots = torch.remainder(self.ptr + torch.arange(n, device=self.ptr.device), size)
        self.student.index_copy_(0, slots, e_s.detach().to(self.student.dtype))
        self.teacher.index_copy_(0, slots, e_t.detach().to(self.teacher.dtype))
        self.ptr.copy_(torch.remainder(self.ptr + n, size))
        self.filled.copy_(torch.clamp(self.filled + n, max=size))


@float32_math
def _normalise(e: torch.Tensor) -> torch.Tensor:
    return F.normalize(e, dim=1)


def _info_nce(anchor: torch.Tensor, positive: torch.Tensor, queue: torch.Tensor, filled: torch.Tensor,
              temperature: float) -> torch.Tensor:
    """Cross-entropy with the positive at index 0, then in-batch negatives, then the queue's entries.

    In-batch negatives count only while the queue is empty; queue slots count only once written. The
    switch is a mask on tensors (no host read); masked logits are -inf, so they drop out exactly.
    """
    b, size = anchor.shape[0], queue.shape[0]
    pos = (anchor * positive).sum(dim=1, keepdim=True) / temperature
    in_batch = anchor @ positive.t() / temperature
    own = torch.eye(b, dtype=torch.bool, device=anchor.device)
    in_batch = in_batch.masked_fill(own | (filled > 0), float("-inf"))
    queued = anchor @ queue.t() / temperature
    queued = queued.masked_fill(torch.arange(size, device=anchor.device) >= filled, float("-inf"))
    logits = torch.cat([pos, in_batch, queued], dim=1)
    return F.cross_entropy(logits, torch.zeros(b, dtype=torch.long, device=anchor.device))


@float32_math
def crd_loss(e_s: torch.Tensor, e_t: torch.Tensor, queue_s: torch.Tensor, queue_t: torch.Tensor,
             filled: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE on normalised embeddings: student anchors against teacher negatives and back."""
    return 0.5 * (_info_nce(e_s, e_t, queue_t, filled, temperature) + _info_nce(e_t, e_s, queue_s, filled, temperature))


@register_distiller("crd")
class CRD(Distiller):
    """CRD with a queue of ``queue_size`` past embeddings per net instead of one slot per training
    sample (CRD's bank holds the whole dataset and draws 16384 negatives): memory is bounded and
    independent of the dataset, and no sample indices are needed. The current batch is enqueued after
    its loss is computed, only in training mode; the loop must put the distiller in train()/eval().
    """

    spot_kind = "embedding"
    weight = 0.8

    def __init__(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape], feat_dim: int = 128,
                 nce_t: float = 0.07, queue_size: int = 4096) -> None:
        super().__init__(student_shapes, teacher_shapes)
        if not nce_t > 0:
            raise GraftkdError(f"crd: nce_t must be positive; got {nce_t}")
        if int(queue_size) < 1 or int(feat_dim) < 1:
            raise GraftkdError(f"crd: queue_size and feat_dim must be >= 1; got {queue_size}, {feat_dim}")
        self.nce_t = float(nce_t)
        self.embed_s = nn.ModuleList(nn.Linear(flat_dim(s), int(feat_dim)) for s in self.student_shapes)
        self.embed_t = nn.ModuleList(nn.Linear(flat_dim(t), int(feat_dim)) for t in self.teacher_shapes)
        self.queues = nn.ModuleList(EmbeddingQueue(int(queue_size), int(feat_dim)) for _ in self.student_shapes)

    def spot_losses(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        losses = []
        for embed_s, embed_t, queue, s, t in zip(self.embed_s, self.embed_t, self.queues, student, teacher):
            e_s = _normalise(embed_s(flat(s.float())))
            e_t = _normalise(embed_t(flat(t.float())))
            # clones: the loss keeps the queues for its backward pass, and push() writes them in place
            losses.append(crd_loss(e_s, e_t, queue.student.clone(), queue.teacher.clone(), queue.filled,
                                   self.nce_t))
            if self.training:
                queue.push(e_s, e_t)
        return losses
