"""Data-parallel training across processes that ``torchrun`` starts (gloo on CPU, NCCL on GPUs).

Only what trains is wrapped (the student and its extra modules, never the frozen teacher); every process
draws the same global batch from the same generator and trains on its own share of it, so N processes
take the steps one process would take, with gradients averaged across them.
"""
from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

# how long a finishing process waits for its peers before it tears the process group down anyway
_EXIT_WAIT = timedelta(seconds=60)


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[World, str]:
    """Join the process group torchrun describes in the environment (no-op for a single process)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        # a process group still alive at interpreter exit can abort the process ("terminate called without an
        # active exception" from gloo's threads), turning a finished run into a failed one
        atexit.register(_destroy_process_group)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    return World(dist.get_rank(), dist.get_world_size(), local_rank), device


def _destroy_process_group() -> None:
    if not dist.is_initialized():
        return
    try:
        # Every process reaches this point before any tears down. Process 0 hosts the rendezvous store, so if it
        # tears down first, a peer still finishing its last collective can lose its connections and abort at exit
        # (seen once in the two-process test). The wait is bounded, so a peer that died cannot hang the others.
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=_EXIT_WAIT)
        else:
            dist.barrier()
    except RuntimeError:
        pass
    dist.destroy_process_group()


def _barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


class _Closure(nn.Module):
    """Holds the trainable modules; ``forward(fn)`` runs ``fn`` so DDP sees the step as its forward."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(modules)

    def forward(self, fn: Callable[[], object]) -> object:
        return fn()


def broadcast_object(world: World, value):
    """Process 0's ``value`` on every process (itself when there is one process)."""
    if world.size <= 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _wrap(module: _Closure, world: World, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    if world.size <= 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False, find_unused_parameters=find_unused_parameters)
