"""The eps schedule (Shi et al. 2021), phases and ramp-following weights."""

from __future__ import annotations

import pytest

from tightrope.train import EpsConfig, EpsShape, Phase, Schedule, smoothed_ramp


def test_smoothed_ramp_is_polynomial_then_linear_and_continuous() -> None:
    mid, power = 0.25, 4.0
    assert smoothed_ramp(0.0) == 0.0
    assert smoothed_ramp(1.0) == pytest.approx(1.0)
    # t^4 in the first quarter: doubling t multiplies by 16.
    assert smoothed_ramp(0.2) / smoothed_ramp(0.1) == pytest.approx(16.0)
    # Linear afterwards: equal increments.
    a, b, c = smoothed_ramp(0.5), smoothed_ramp(0.7), smoothed_ramp(0.9)
    assert b - a == pytest.approx(c - b)
    # Value and slope continuous at the joint.
    h = 1e-6
    assert smoothed_ramp(mid - h) == pytest.approx(smoothed_ramp(mid + h), abs=1e-5)
    left = (smoothed_ramp(mid - h) - smoothed_ramp(mid - 2 * h)) / h
    right = (smoothed_ramp(mid + 2 * h) - smoothed_ramp(mid + h)) / h
    assert left == pytest.approx(right, rel=1e-3)
    values = [smoothed_ramp(i / 100, mid, power) for i in range(101)]
    assert values == sorted(values)


def test_schedule_phases_eps_and_weights() -> None:
    eps = EpsConfig(train=0.3, warmup_epochs=1, ramp_epochs=2)
    schedule = Schedule(eps, steps_per_epoch=10)
    assert [schedule.phase(s) for s in (0, 9, 10, 29, 30, 100)] == [
        Phase.WARMUP, Phase.WARMUP, Phase.RAMP, Phase.RAMP, Phase.FULL, Phase.FULL]
    assert schedule.eps_at(5) == 0.0
    assert 0.0 < schedule.eps_at(10) < 0.01
    assert schedule.eps_at(29) == pytest.approx(0.3)
    assert schedule.eps_at(30) == 0.3
    ramp = [schedule.eps_at(s) for s in range(10, 30)]
    assert ramp == sorted(ramp)
    # CROWN-IBP's beta 1 -> 0 follows eps; Shi's weight fades with eps, is lambda in the
    # warm-up (Shi et al.'s code regularises it) and 0 once eps is full.
    assert schedule.interpolate((1.0, 0.0), 5) == 1.0
    assert schedule.interpolate((1.0, 0.0), 19) == pytest.approx(1 - schedule.eps_at(19) / 0.3)
    assert schedule.interpolate((1.0, 0.0), 40) == 0.0
    expected = 0.5 * (1 - schedule.eps_at(10) / 0.3)
    assert schedule.regularizer_weight(0.5, 10) == pytest.approx(expected)
    assert schedule.regularizer_weight(0.5, 5) == 0.5
    assert schedule.regularizer_weight(0.5, 30) == 0.0


def test_linear_shape_and_start() -> None:
    eps = EpsConfig(train=0.2, start=0.1, ramp_epochs=1, shape=EpsShape.LINEAR)
    schedule = Schedule(eps, steps_per_epoch=4)
    assert [schedule.eps_at(s) for s in range(4)] == pytest.approx([0.125, 0.15, 0.175, 0.2])


def test_beta_and_kappa_follow_eps_not_ramp_progress() -> None:
    # Zhang et al. 2020's and Shi et al. 2021's code: beta = 1 - eps_t / eps_max (final beta 0),
    # kappa = 1 - (1 - final_kappa) eps_t / eps_max. On the smoothed ramp eps_t / eps_max at a
    # quarter of the ramp is 1/13 (c t^4 with c = 1 / (mid^4 + 4 mid^3 (1 - mid)), mid = 1/4),
    # at half 5/13 and at three quarters 9/13; ramp progress would give 0.75, 0.5 and 0.25.
    eps = EpsConfig(train=8 / 255, warmup_epochs=1, ramp_epochs=4)
    schedule = Schedule(eps, steps_per_epoch=100)
    quarter, half, three_quarters = (100 + 100 * k - 1 for k in (1, 2, 3))
    assert schedule.progress(quarter) == 0.25
    assert schedule.interpolate((1.0, 0.0), quarter) == pytest.approx(12 / 13)  # 0.923
    assert schedule.interpolate((1.0, 0.0), half) == pytest.approx(8 / 13)
    assert schedule.interpolate((1.0, 0.0), three_quarters) == pytest.approx(4 / 13)
    assert schedule.interpolate((1.0, 0.5), quarter) == pytest.approx(1 - 0.5 / 13)
    assert schedule.interpolate((1.0, 0.5), half) == pytest.approx(1 - 2.5 / 13)
    assert schedule.interpolate((1.0, 0.0), 0) == 1.0              # warm-up: eps 0
    assert schedule.interpolate((1.0, 0.5), 499) == pytest.approx(0.5)  # last ramp step
    assert schedule.interpolate((1.0, 0.0), 500) == 0.0            # full eps
    for step in range(100, 500, 7):
        assert schedule.interpolate((1.0, 0.0), step) == pytest.approx(
            1 - schedule.eps_at(step) / eps.train)
    # A linear ramp from a non-zero start: the weight follows eps itself, as in Zhang's code.
    linear = Schedule(EpsConfig(train=0.4, start=0.2, ramp_epochs=2, shape=EpsShape.LINEAR), 2)
    assert [linear.interpolate((1.0, 0.0), s) for s in range(4)] == pytest.approx(
        [0.375, 0.25, 0.125, 0.0])
