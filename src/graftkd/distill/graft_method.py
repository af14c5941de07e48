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
        from graftkd.graft import GraftConfig, graft

        config = GraftConfig(
            shots=task.shots, batch_size=task.batch_size, schedule=task.schedule, inherit=task.inherit,
            inherit_trainable=self.options["inherit_trainable"], augment=task.augment is not None,
            padding=task.padding, flip=task.flip, mixup=task.mixup, seed=task.seed, precision=task.precision,
            checkpoint_every_s=task.checkpoint_every_s, log_every=task.log_every, eval_every=task.eval_every,
            freeze_norm_stats=self.options["freeze_norm_stats"],
        )
        result = graft(task.teacher, task.student, task.images, normalize=task.normalize, config=config,
                       device=task.device, run_dir=task.run_dir, progress=task.progress, eval_hook=task.eval_hook,
                       init_adapters=init_adapters)
        summary = result.summary()
        return MethodOutcome(student=result.student, stages=summary["stages"],
                             extra={"blocks": summary["blocks"], "inherited_blocks": summary["inherited_blocks"],
                                    "merge_max_abs_diff": summary["merge_max_abs_diff"], "seconds": result.seconds})
