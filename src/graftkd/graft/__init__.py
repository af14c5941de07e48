"""Progressive network grafting (Shen et al., AAAI 2021): block grafting, network grafting, exact merge."""
from graftkd.graft.api import GraftConfig, GraftResult, graft
from graftkd.graft.loss import normalized_logit_loss
from graftkd.graft.plan import GraftPlan, build_plan
from graftkd.graft.schedule import PRESETS, ScheduleConfig, StageSpec, batch_size_for, build_schedule

__all__ = [
    "GraftConfig",
    "GraftPlan",
    "GraftResult",
    "PRESETS",
    "ScheduleConfig",
    "StageSpec",
    "batch_size_for",
    "build_plan",
    "build_schedule",
    "graft",
    "normalized_logit_loss",
]
