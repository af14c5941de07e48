"""Grafting that starts from FSKD's student instead of He-initialised blocks (not in the paper).

Why: on CIFAR-10 VGG16-BN at one image per class, grafting from freshly initialised blocks reached about
55 %, while FSKD's closed-form student (the teacher pruned to the student's widths by L1 norm, then
least-squares 1×1 corrections) reached about 91 % without a gradient step
(results/cifar10-vgg16-graft/NOTES.md). This method asks whether grafting's stages add to that start or
wear it down.

How: the student is pruned, and with ``init="fskd"`` corrected, exactly as :mod:`graftkd.distill.fewshot.fskd`
does it (``init="pruned"`` skips the corrections). Every adapter then starts as the channel choice the
pruning made at its cut: teacher→student keeps the kept channels, student→teacher writes them back
(zeros for pruned channels). Their product is the identity, so the merged student before the first step
*is* the initial student, and grafting's usual stages (same schedule, same budget) train it from there.
The student must be a channel-pruned teacher (FSKD's condition); other pairs are "unsupported".
"""
from __future__ import annotations

import torch
from torch import nn

from graftkd.distill.base import FewShotTask, MethodOutcome, register_method
from graftkd.distill.fewshot.fskd import FSKD
from graftkd.distill.fewshot.graft_method import Graft
from graftkd.errors import GraftkdError, UnsupportedPairing

INITS = ("fskd", "pruned")


@register_method("graft_fskd")
class GraftFromFSKD(Graft):
    defaults = {**Graft.defaults, "init": "fskd", "ridge": 1e-4}

    def run(self, task: FewShotTask) -> MethodOutcome:
        init = self.options["init"]
        if init not in INITS:
            raise GraftkdError(f"graft_fskd option init must be one of {', '.join(INITS)}, got {init!r}")
        fitted, layers = FSKD(ridge=float(self.options["ridge"]), correct=init == "fskd").fit(task)
        start = {"init": init, "seconds": fitted.extra["seconds"],
                 **{key: fitted.extra[key] for key in ("logit_rel_error_pruned", "logit_rel_error_corrected")}}
        kept = {layer.path: layer.out_keep for layer in layers}
        outcome = self.graft(task, init_adapters=lambda plan: select_pruned_channels(plan, kept))
        outcome.extra["start"] = start
        return outcome


def select_pruned_channels(plan, kept: dict[str, torch.Tensor]) -> None:
    """Set each cut's adapter pair to the channels pruning kept at the end of the block before the cut.

    Those are the output channels of the block's last Conv2d/Linear (blocks are plain chains: the
    BatchNorm, ReLU and pooling after it act per channel).
    """
    paths = {id(module): name for name, module in plan.student.named_modules()}
    for cut in plan.adapter_cuts:
        block = plan.student_blocks[cut]
        layers = [paths.get(id(m)) for m in block.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        channels = kept.get(layers[-1]) if layers else None
        width = plan.student_out[cut].channels
        if channels is None or len(channels) != width:
            raise UnsupportedPairing(
                f"graft_fskd cannot tell which teacher channels block {cut + 1} ('{plan.names[cut]}') of the "
                f"student keeps: its last conv/linear layer is not one FSKD pruned to its {width} output "
                "channels; use graft for this pair"
            )
        plan.scions[cut].adapter_out.set_channel_selection(channels)
        plan.scions[cut + 1].adapter_in.set_channel_selection(channels)
