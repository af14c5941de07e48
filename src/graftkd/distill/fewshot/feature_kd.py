"""KD plus feature matching for students derived from the teacher: dense targets from a few images.

Why: ten logits per image are little signal when K is 1 to 10; a derived student's stage outputs are
the teacher's own channels (all of them after a depth derivation, the kept ones after a width one), so
the teacher's feature maps at the same module paths are direct targets without any regressor. The loss
is KD (KL at temperature T, times T²) plus ``beta`` times the sum over stages of the relative squared
error ‖S − T[kept]‖² / ‖T[kept]‖².

Options: ``temperature``, ``beta``. The caller may set ``select`` (student path -> kept teacher channels)
after a width derivation and ``pairs`` ((student path, teacher path) of finer spots, e.g. every kept unit
after a depth derivation); the student's ``feature_paths()`` shared with the teacher (every stage
boundary, without the pooled embedding) are always matched.
"""
from __future__ import annotations

import torch

from graftkd.distill.base import LossMethod, LossStage, register_method
from graftkd.distill.losses import kd_loss, relative_feature_loss
from graftkd.errors import UnsupportedPairing


@register_method("feature_kd")
class FeatureKD(LossMethod):
    defaults = {"temperature": 4.0, "beta": 1.0}

    def setup(self, task) -> None:
        self.select: dict[str, torch.Tensor] = dict(getattr(self, "select", {}) or {})
        # (student path, teacher path) pairs; the caller may give finer ones (every kept unit after a depth
        # derivation: a student unit matches the teacher's stream where the next kept unit begins)
        pairs = list(getattr(self, "pairs", []) or [])
        paths = getattr(task.student, "feature_paths", None)
        if paths is None and not pairs:
            raise UnsupportedPairing("feature_kd needs a zoo student with feature paths (stages)")
        student_paths = paths()[:-1] if paths is not None else []  # the pooled embedding is the logits' business
        teacher_paths = task.teacher.feature_paths()[:-1] if hasattr(task.teacher, "feature_paths") else []
        taken = {s for s, _ in pairs}
        pairs += [(p, p) for p in student_paths if p in teacher_paths and p not in taken]
        if not pairs:
            raise UnsupportedPairing("feature_kd: teacher and student share no feature path; use kd")
        self.pairs = pairs
        self.frozen = []

    def stages(self, task) -> list[LossStage]:
        return [LossStage("feature_kd", task.epochs, task.lr, [task.student])]

    def teacher_paths(self, stage) -> list[str]:
        return sorted({t for _, t in self.pairs})

    def student_paths(self, stage) -> list[str]:
        return sorted({s for s, _ in self.pairs})

    def loss(self, stage, student_logits, teacher_logits, student_features, teacher_features):
        terms = {"kd": kd_loss(student_logits, teacher_logits, self.options["temperature"])}
        features = student_logits.new_zeros(())
        for path, teacher_path in self.pairs:
            t = teacher_features[teacher_path]
            keep = self.select.get(path)
            if keep is not None:
                t = t.index_select(1, keep.to(t.device))
            features = features + relative_feature_loss(student_features[path], t)
        terms["features"] = self.options["beta"] * features
        return terms
