"""Soundness in floating point at any scale: no stage says VERIFIED where a violating point
exists, whatever the magnitudes, in float32 and float64; NaN and overflow never close anything;
non-finite weights are refused."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from tightrope.bounds import (
    Box,
    dual_lower,
    lower,
    optimise_split_bound,
    pre_activation_bounds,
    rounding,
    sound_interval,
    sound_lower,
)
from tightrope.verify import BabConfig, Mode, VerifierConfig, verify
from tightrope.verify.spec import Region, Specification, UnsafeSet, VerifyStatus

DTYPES = (torch.float32, torch.float64)


def cancelling_net(dtype: torch.dtype, inputs: int = 20, weight: float = 1e4,
                   at: float = 0.37) -> nn.Sequential:
    """``y = sum_i relu(w (x_i - at)) + relu(-w (x_i - at)) - 1``: minimum -1 at ``x = at``."""
    first, second = nn.Linear(inputs, 2 * inputs), nn.Linear(2 * inputs, 1)
    with torch.no_grad():
        first.weight.zero_()
        for i in range(inputs):
            first.weight[2 * i, i], first.bias[2 * i] = weight, -weight * at
            first.weight[2 * i + 1, i], first.bias[2 * i + 1] = -weight, weight * at
        second.weight.fill_(1.0)
        second.bias.fill_(-1.0)
    return nn.Sequential(first, nn.ReLU(), second).to(dtype).eval()


def nonnegative_output_spec(inputs: int, radius: float) -> Specification:
    """``-radius <= x_i <= radius``; unsafe: ``y_0 <= 0``."""
    box = Box(torch.full((1, inputs), -radius, dtype=torch.float64),
              torch.full((1, inputs), radius, dtype=torch.float64))
    unsafe = UnsafeSet(A=torch.ones(1, 1, dtype=torch.float64),
                       b=torch.zeros(1, dtype=torch.float64))
    return Specification((Region(box, (unsafe,)),))


CONFIGS = {
    "cascade": VerifierConfig(attack_restarts=0, strong_attack_restarts=0,
                              bab=BabConfig(attack_every=0)),
    "input_split": VerifierConfig(attack_restarts=0, strong_attack_restarts=0,
                                  bab=BabConfig(attack_every=0, input_split_max_dim=64)),
    "model_dtype": VerifierConfig(attack_restarts=0, strong_attack_restarts=0, dtype=None,
                                  bab=BabConfig(attack_every=0)),
    "milp": VerifierConfig(mode=Mode.MILP, attack_restarts=0),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("radius", [1.0, 1e4, 1e8, 1e16])
def test_cancelling_net_over_a_huge_box_is_never_verified(
    dtype: torch.dtype, name: str, radius: float
) -> None:
    model = cancelling_net(dtype)
    spec = nonnegative_output_spec(20, radius)
    x = torch.full((1, 20), 0.37, dtype=torch.float64)
    with torch.no_grad():
        assert float(model.double()(x)) == pytest.approx(-1.0)
    model = model.to(dtype)
    verdict = verify(model, spec, timeout=3.0, config=CONFIGS[name])
    assert verdict.status is not VerifyStatus.VERIFIED, (name, verdict)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sound_bounds_of_the_cancelling_net_stay_below_its_minimum(dtype: torch.dtype) -> None:
    model = cancelling_net(dtype)
    for radius in (1.0, 1e4, 1e8, 1e12, 1e16, 1e20):
        box = Box(torch.full((1, 20), -radius, dtype=dtype),
                  torch.full((1, 20), radius, dtype=dtype))
        C = torch.ones(1, 1, 1, dtype=dtype)
        net = lower(model, box.center)
        assert float(sound_interval(net, box, C)) <= -1.0
        boxes = {i: rounding(net, box).widen(i, b)
                 for i, b in pre_activation_bounds(net, box).boxes.items()}
        found = optimise_split_bound(net, box, C, boxes, {}, steps=5)
        assert float(dual_lower(net, box, C, boxes, found.pre_coefficients)) <= -1.0


def planted_net(generator: torch.Generator, scale: float, dtype: torch.dtype,
                width: int = 12, depth: int = 3, inputs: int = 4) -> nn.Sequential:
    layers: list[nn.Module] = []
    sizes = [inputs] + [width] * depth + [1]
    for fan_in, fan_out in itertools.pairwise(sizes):
        linear = nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            weight_scale = scale ** (torch.rand((), generator=generator) * 2 - 1)
            linear.weight.copy_(torch.randn(fan_out, fan_in, generator=generator) * weight_scale)
            linear.bias.copy_(torch.randn(fan_out, generator=generator) * weight_scale)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).to(dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(6))
def test_random_nets_at_every_magnitude_never_verify_a_planted_violation(
    dtype: torch.dtype, seed: int
) -> None:
    """Magnitudes 1e-3..1e12 of weights and boxes; the unsafe set ``y <= f(x*)`` holds at the
    planted point ``x*`` (its value computed in float64), so VERIFIED is always wrong."""
    generator = torch.Generator().manual_seed(seed)
    scale = 10.0 ** (3 + 3 * seed % 10)
    model = planted_net(generator, scale if seed % 2 else 1e-3 * scale, dtype)
    box_scale = 10.0 ** float(torch.randint(-3, 13, (), generator=generator))
    center = torch.randn(1, 4, generator=generator, dtype=torch.float64) * box_scale
    radius = box_scale * (0.01 + torch.rand(1, 4, generator=generator, dtype=torch.float64))
    box = Box(center - radius, center + radius)
    point = center + radius * (torch.rand(1, 4, generator=generator, dtype=torch.float64) * 2 - 1)
    value = float(model.double()(point))
    model = model.to(dtype)
    if not math.isfinite(value):
        pytest.skip("the planted value overflows float64")
    # Unsafe: y <= value (attained at the planted point, in exact arithmetic up to float64's).
    threshold = value + abs(value) * 1e-12 + 1e-300
    spec = Specification((Region(box, (UnsafeSet(
        A=torch.ones(1, 1, dtype=torch.float64),
        b=torch.tensor([threshold], dtype=torch.float64)),)),))
    for name in ("cascade", "input_split", "model_dtype", "milp"):
        verdict = verify(model, spec, timeout=2.0, config=CONFIGS[name])
        assert verdict.status is not VerifyStatus.VERIFIED, (name, scale, box_scale, verdict)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_weights_are_refused_before_any_bound(dtype: torch.dtype) -> None:
    model = cancelling_net(dtype)
    with torch.no_grad():
        model[2].weight.fill_(math.nan)
    with pytest.raises(ValueError, match=r"non-finite.*2\.weight"):
        verify(model, nonnegative_output_spec(20, 1.0), timeout=2.0)


def test_nan_or_infinite_bounds_never_close() -> None:
    lower_bounds = torch.tensor([math.nan, math.inf, -math.inf, 1.0, 1.0])
    allowance = torch.tensor([0.0, 0.0, 0.0, math.nan, math.inf])
    assert bool((sound_lower(lower_bounds, allowance) == -math.inf).all())
    assert float(sound_lower(torch.tensor([1.0]), torch.tensor([0.5]))) < 0.5 + 1e-7


@pytest.mark.parametrize("dtype", DTYPES)
def test_overflowing_intermediate_bounds_never_verify(dtype: torch.dtype) -> None:
    """Weights near the dtype's largest value: the bounds overflow to inf and inf - inf = NaN
    in the backward pass; branch-and-bound must not read that as closed."""
    big = torch.finfo(dtype).max / 16
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(),
                          nn.Linear(4, 1)).to(dtype).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            pattern = [[1.0, -1.0]] * 4 if layer is model[0] else [[1.0, -1.0, 1.0, -1.0]] * 4
            layer.weight.copy_(torch.tensor(pattern, dtype=dtype) * big)
            layer.bias.zero_()
        model[4].weight.copy_(torch.tensor([[1.0, -1.0, 1.0, -1.0]]))
        model[4].bias.fill_(-1.0)
    spec = nonnegative_output_spec(2, 1.0)
    for name in ("cascade", "input_split", "model_dtype"):
        verdict = verify(model, spec, timeout=2.0, config=CONFIGS[name])
        assert verdict.status is not VerifyStatus.VERIFIED, (name, verdict)
