"""dd.lr: the one learning-rate decay shape that DD, DD2 and the tiny-model training scripts share."""

import math

import pytest

from dd.lr import decayed
from dd.models.llamagen.training import warmup_cosine_factor
from dd.tasks.distillation import OptimConfig, lr_lambda


def test_decayed_endpoints_midpoint_and_clamping() -> None:
    assert decayed(0.0, 0.1) == pytest.approx(1.0)
    assert decayed(1.0, 0.1) == pytest.approx(0.1)
    assert decayed(0.5, 0.1) == pytest.approx(0.55)  # half cosine: the mean of base and floor halfway
    assert decayed(0.25, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert decayed(0.25, 0.0, "linear") == pytest.approx(0.75)
    assert decayed(-1.0, 0.2) == pytest.approx(1.0) and decayed(3.0, 0.2) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="expected one of cosine, linear"):
        decayed(0.5, 0.1, "step")


def test_dd_schedule_warms_up_then_decays_to_its_floor() -> None:
    factor = lr_lambda(OptimConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1), total_steps=110)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.55) and factor(110) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)
    linear = lr_lambda(OptimConfig(warmup_steps=10, decay="linear", min_lr_ratio=0.0), total_steps=110)
    assert linear(35) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="optim.decay='step'"):
        OptimConfig(decay="step")  # when the task is built, not when the warm-up ends
    with pytest.raises(ValueError, match="min_lr_ratio"):
        OptimConfig(min_lr_ratio=2.0)


def test_teacher_scripts_factor_is_progress_driven() -> None:
    assert warmup_cosine_factor(0.05, warmup_fraction=0.1) == pytest.approx(0.5)  # warm-up
    assert warmup_cosine_factor(0.55, warmup_fraction=0.1, final_ratio=0.02) == pytest.approx(0.51)
    assert warmup_cosine_factor(1.0, warmup_fraction=0.1, final_ratio=0.02) == pytest.approx(0.02)
