"""Progressive network grafting (the method of this toolkit) behind the same contract as the baselines."""
from __future__ import annotations

from collections.abc import Callable

from graftkd.distill.base import FewShotMethod, FewShotTask, MethodOutcome, register_method


@register_method("graft")
class Graft(FewShotMethod):
    defaults = {"inherit_trainable": False, "freeze_norm_stats": False}

    def run(self, task: FewShotTask) -> MethodOutcome:
        return self.graft(task)

    def graft(self, task: FewShotTask, init_adapters: Callable | None = None) -> MethodOutcome:
        """Run :func:`graftkd.graft.graft` on the task; subclasses may start the adapters elsewhere."""
        from dataclasses import fields

        from graftkd.graft import GraftConfig, graft

        # the task's settings under the same names; the two that differ in kind are said here: the task holds
        # the augmentation itself (the config a switch), and the task's channels_last is a run's resolved
        # choice for the shared loop, while grafting resolves its own (None: per device)
        differ = {"augment", "channels_last"}
        shared = {f.name for f in fields(GraftConfig)} & {f.name for f in fields(FewShotTask)} - differ
        config = GraftConfig(**{name: getattr(task, name) for name in shared}, augment=task.augment is not None,
                             inherit_trainable=self.options["inherit_trainable"],
                             freeze_norm_stats=self.options["freeze_norm_stats"])
        result = graft(task.teacher, task.student, task.images, normalize=task.normalize, config=config,
                       device=task.device, run_dir=task.run_dir, progress=task.progress, eval_hook=task.eval_hook,
                       init_adapters=init_adapters)
        summary = result.summary()
        return MethodOutcome(student=result.student, stages=summary["stages"],
                             extra={"blocks": summary["blocks"], "inherited_blocks": summary["inherited_blocks"],
                                    "merge_max_abs_diff": summary["merge_max_abs_diff"], "seconds": result.seconds})
