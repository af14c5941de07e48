"""``StagedModel``: a BlockModel whose grafting blocks are runs of consecutive stages.

The CIFAR-100 benchmark zoo (``resnet_repdistiller``, ``wrn``, ``vgg_repdistiller``, ``mobilenetv2``, ``shufflenet``,
``resnet50_cifar``) describes each network once, as its list of stages (features f_0 .. f_{n-1}, then
the classifier), and states how many consecutive stages form each grafting block. Deriving
``block_parts()`` from ``stage_parts()`` this way makes both cuts the same sequence of module calls
by construction, and every block boundary a stage boundary.
"""
from __future__ import annotations

import torch.nn as nn

from graftkd.models.base import BlockModel


class StagedModel(BlockModel):
    """Subclasses implement ``stage_parts()`` / ``stage_names()`` and set ``stages_per_block``."""

    #: how many consecutive stages each grafting block holds, in order; sums to the number of stages.
    stages_per_block: tuple[int, ...] = ()

    def stage_parts(self) -> list[list[nn.Module]]:
        raise NotImplementedError

    def stage_names(self) -> list[str]:
        raise NotImplementedError

    def _stage_groups(self, n_stages: int) -> list[range]:
        if sum(self.stages_per_block) != n_stages or min(self.stages_per_block, default=0) < 1:
            raise ValueError(
                f"{type(self).__name__}: stages_per_block {self.stages_per_block} does not split {n_stages} stages"
            )
        groups, start = [], 0
        for k in self.stages_per_block:
            groups.append(range(start, start + k))
            start += k
        return groups

    def block_parts(self) -> list[list[nn.Module]]:
        stages = self.stage_parts()
        return [[part for i in group for part in stages[i]] for group in self._stage_groups(len(stages))]

    def block_names(self) -> list[str]:
        names = self.stage_names()
        return ["+".join(names[i] for i in group) for group in self._stage_groups(len(names))]
