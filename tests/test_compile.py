"""torch.compile in the one loop: the rule that decides it, and a compiled run that trains as the eager one does."""
from __future__ import annotations

import pytest
import torch

from graftkd.distill.base import build_method
from graftkd.engine import compiled
from graftkd.engine.recipe import Recipe
from test_patient import _task  # noqa: E402  (the tests folder is on sys.path, as for bad_inputs)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, while compiling


def test_the_rule_compiles_only_long_plain_runs() -> None:
    cpu = torch.device("cpu")
    assert not compiled.decide("off", 10**6, plain_step=True, device=cpu)["used"]
    assert not compiled.decide("auto", compiled.AUTO_MIN_STEPS - 1, plain_step=True, device=cpu)["used"]
    assert compiled.decide("auto", compiled.AUTO_MIN_STEPS, plain_step=True, device=cpu)["used"]
    hooked = compiled.decide("on", 10**6, plain_step=False, device=cpu)
    assert not hooked["used"] and "hooks" in hooked["why"]
    with pytest.raises(ValueError, match="off, on, auto"):
        compiled.decide("yes", 1, plain_step=True, device=cpu)


def test_a_compiled_run_trains_like_the_eager_one_and_says_so() -> None:
    # 5 steps of 8 and a remainder batch of 4 (run eagerly: no second graph for another size)
    recipe = Recipe(samples=8 * 5 + 4, batch_size=8, steps_per_chunk=3, recalibrate_bn=False)
    eager = build_method("kd").run(_task(recipe))
    fast = build_method("kd").run(_task(recipe, compile="on"))
    assert fast.extra["compile"]["used"] and not eager.extra["compile"]["used"]
    assert "failed" not in fast.extra["compile"]
    for (name, a), b in zip(eager.student.state_dict().items(), fast.student.state_dict().values()):
        if a.is_floating_point():  # fused kernels round differently: close, not bit-equal
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name
