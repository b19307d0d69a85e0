"""Bounds that are proofs in floating point: the dual bound holds for any multipliers, the
rigorous values never exceed the exact minimum (even where plain float32 arithmetic does), the
a priori widening covers pre-activation bounds computed in float32, and HiGHS is trusted only
inside its coefficient range."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch import Tensor, nn

from tightrope.bounds import (
    Box,
    MilpStatus,
    Normalize,
    apply_splits,
    certified_split_bound,
    dual_lower,
    ibp,
    lower,
    optimise_split_bound,
    pre_activation_bounds,
    rounding,
    sound_interval,
    sound_lower,
    unit_roundoff,
)

DTYPES = (torch.float32, torch.float64)


def conv_net(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        Normalize([0.4], [0.3]), nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3),
        nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 5),
    )
    with torch.no_grad():
        model[2].running_mean.uniform_(-0.2, 0.2)
        model[2].running_var.uniform_(0.5, 2.0)
    return model.to(dtype).eval()


def samples(box: Box, count: int, generator: torch.Generator) -> Tensor:
    """``(count, B, *S)``: corners and uniform points of each box."""
    shape = (count, *box.lower.shape)
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    u[: count // 2] = u[: count // 2].round()
    return box.lower.double() + u * (box.upper - box.lower).double()


def exact_rows(model: nn.Module, points: Tensor, C: Tensor) -> Tensor:
    """``(count, B, K)``: ``C f(x)`` in float64 at ``points: (count, B, *S)``."""
    model64 = __import__("copy").deepcopy(model).double()
    with torch.no_grad():
        out = model64(points.flatten(0, 1)).view(points.shape[0], points.shape[1], -1)
    return torch.einsum("bkn,sbn->sbk", C.double(), out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(3))
def test_the_dual_bound_holds_for_any_multipliers(dtype: torch.dtype, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    model = conv_net(dtype)
    x = torch.rand(3, 1, 8, 8, generator=generator).to(dtype)
    box = Box.from_linf(x, 0.15)
    C = torch.randn(3, 4, 5, generator=generator).to(dtype)
    net = lower(model, box.center)
    boxes = {i: rounding(net, box).widen(i, b)
             for i, b in pre_activation_bounds(net, box).boxes.items()}
    multipliers = {i: torch.randn(3, 4, *net.shapes[i], generator=generator).to(dtype) * 3
                   for i in net.relu_indices}
    value = dual_lower(net, box, C, boxes, multipliers)
    reference = exact_rows(model, samples(box, 2000, generator), C).amin(dim=0)
    assert bool((value <= reference).all())
    # At the search's own multipliers the dual bound is the search's bound, up to rounding.
    found = optimise_split_bound(net, box, C, boxes, {}, steps=3)
    value = dual_lower(net, box, C, boxes, found.pre_coefficients)
    assert bool((value <= reference).all())
    slack = 1e-9 if dtype == torch.float64 else 2e-3
    assert bool((value >= found.lower.detach() - slack * (1 + found.lower.abs())).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_subdomains_with_multipliers_stay_sound(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(5)
    model = conv_net(dtype)
    x = torch.rand(1, 1, 8, 8, generator=generator).to(dtype)
    box = Box.from_linf(x, 0.2)
    net = lower(model, box.center)
    boxes = {i: rounding(net, box).widen(i, b)
             for i, b in pre_activation_bounds(net, box).boxes.items()}
    first = net.relu_indices[0]
    unstable = ((boxes[first].lower < 0) & (boxes[first].upper > 0)).flatten().nonzero()
    assert unstable.numel() > 0
    neuron = int(unstable[0])
    points = samples(box, 4000, generator)[:, 0]
    with torch.no_grad():  # the first pre-activation (after BatchNorm), in float64
        pre = __import__("copy").deepcopy(model).double()[:3](points)
    C = torch.randn(1, 3, 5, generator=generator).to(dtype)
    for phase in (1, -1):
        signs = {i: torch.zeros(b.lower.shape, dtype=torch.int8) for i, b in boxes.items()}
        signs[first].view(-1)[neuron] = phase
        split = apply_splits(boxes, signs)
        found, value = certified_split_bound(net, box, C, split, signs, steps=5)
        assert found.betas  # split multipliers were in play
        inside = (pre.flatten(1)[:, neuron] * phase) >= 0
        reference = exact_rows(model, points[inside].unsqueeze(1), C).amin(dim=0)
        assert bool((value <= reference).all())


@pytest.mark.parametrize("seed", range(4))
def test_float32_bounds_of_a_cancelling_net_are_wrong_but_the_sound_ones_are_not(
    seed: int,
) -> None:
    """A net whose interval centre cancels terms of 1e12: float32 IBP claims a positive lower
    bound for some boxes; the rigorous bounds never exceed the true minimum."""
    generator = torch.Generator().manual_seed(seed)
    weight, at = 1e4, 0.37
    first, second = nn.Linear(6, 12), nn.Linear(12, 1)
    with torch.no_grad():
        first.weight.zero_()
        for i in range(6):
            first.weight[2 * i, i], first.bias[2 * i] = weight, -weight * at
            first.weight[2 * i + 1, i], first.bias[2 * i + 1] = -weight, weight * at
        second.weight.fill_(1.0)
        second.bias.fill_(-1.0)
    model = nn.Sequential(first, nn.ReLU(), second).eval()
    radius = 10.0 ** float(torch.randint(2, 10, (), generator=generator))
    box = Box(torch.full((1, 6), -radius), torch.full((1, 6), radius))
    C = torch.ones(1, 1, 1)
    net = lower(model, box.center)
    assert float(sound_interval(net, box, C)) <= -1.0
    boxes = {i: rounding(net, box).widen(i, b)
             for i, b in pre_activation_bounds(net, box).boxes.items()}
    _, value = certified_split_bound(net, box, C, boxes, {}, steps=3)
    assert float(value) <= -1.0


@pytest.mark.parametrize("seed", range(3))
def test_widened_float32_boxes_hold_every_float64_pre_activation(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    model = conv_net(torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(10.0 ** float(torch.randint(0, 4, (), generator=generator)))
    x = torch.rand(2, 1, 8, 8, generator=generator)
    box = Box.from_linf(x, 0.3)
    net = lower(model, box.center)
    widened = {i: rounding(net, box).widen(i, b)
               for i, b in pre_activation_bounds(net, box).boxes.items()}
    points = samples(box, 2000, generator)
    model64 = conv_net(torch.float64)
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    values = points.flatten(0, 1)
    with torch.no_grad():
        pre_first = model64[:3](values)
        pre_second = model64[:5](values)
    for pre, index in ((pre_first, net.relu_indices[0]), (pre_second, net.relu_indices[1])):
        found = widened[index]
        shaped = pre.view(points.shape[0], points.shape[1], *pre.shape[1:])
        assert bool((shaped >= found.lower.double()).all())
        assert bool((shaped <= found.upper.double()).all())


def test_sound_interval_is_interval_arithmetic_up_to_its_error() -> None:
    model = conv_net(torch.float64)
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    box = Box.from_linf(x, 0.05)
    C = torch.randn(4, 3, 5, dtype=torch.float64)
    value = sound_interval(lower(model, box.center), box, C)
    plain = ibp(model, box, C).lower
    assert bool((value <= plain).all())
    assert bool((value >= plain - 1e-9 * (1 + plain.abs())).all())


def test_non_finite_values_never_close_anything() -> None:
    values = torch.tensor([math.nan, math.inf, -math.inf, 2.0, 2.0, 2.0])
    allowance = torch.tensor([0.0, 0.0, 0.0, math.nan, math.inf, 1.0])
    result = sound_lower(values, allowance)
    assert bool((result[:5] == -math.inf).all())
    assert 0.99 < float(result[5]) < 1.0
    model = conv_net(torch.float64)
    box = Box.from_linf(torch.rand(1, 1, 8, 8, dtype=torch.float64), 0.1)
    net = lower(model, box.center)
    boxes = dict(pre_activation_bounds(net, box).boxes)
    first = net.relu_indices[0]
    boxes[first] = Box(boxes[first].lower, torch.full_like(boxes[first].upper, math.inf))
    multipliers = {i: torch.ones(1, 1, *net.shapes[i], dtype=torch.float64)
                   for i in net.relu_indices}
    C = torch.ones(1, 1, 5, dtype=torch.float64)
    assert float(dual_lower(net, box, C, boxes, multipliers)) == -math.inf


def test_unit_roundoff() -> None:
    assert unit_roundoff(torch.float64) == 2.0**-53
    assert unit_roundoff(torch.float32) == 2.0**-24
    with pytest.raises(TypeError):
        unit_roundoff(torch.int32)


def test_highs_answers_outside_its_coefficient_range_are_not_proofs() -> None:
    pytest.importorskip("scipy")
    from tightrope.bounds import milp_minimum, milp_search

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)).double().eval()
    box = Box(torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))
    C = torch.ones(1, 1, 1, dtype=torch.float64)
    # Ordinary numbers: infeasible (f cannot reach -1e3) is a proof.
    assert milp_search(model, box, C, torch.tensor([-1e3])).status is MilpStatus.INFEASIBLE
    assert bool(torch.isfinite(milp_minimum(model, box, C).bound).all())
    with torch.no_grad():
        model[0].weight.mul_(1e12)
        model[2].weight.mul_(1e12)
    found = milp_search(model, box, C, torch.tensor([-1e3]))
    assert found.status in (MilpStatus.UNTRUSTED, MilpStatus.FEASIBLE)
    assert bool((milp_minimum(model, box, C).bound == -math.inf).all())


# --- against exact rational arithmetic ---------------------------------------------------------


def _fractions(t: Tensor) -> list[list[Fraction]]:
    rows = t.detach().double().reshape(t.shape[0], -1).tolist()
    return [[Fraction(v) for v in row] for row in rows]


def _matvec(W: list[list[Fraction]], v: list[Fraction]) -> list[Fraction]:
    return [sum((w * x for w, x in zip(row, v, strict=True)), Fraction(0)) for row in W]


def _vecmat(a: list[Fraction], W: list[list[Fraction]]) -> list[Fraction]:
    return [sum((a[i] * W[i][j] for i in range(len(a))), Fraction(0)) for j in range(len(W[0]))]


def _mlp(generator: torch.Generator, dtype: torch.dtype, scale: float) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 1))
    with torch.no_grad():
        for layer in (model[0], model[2], model[4]):
            spread = 10.0 ** (torch.rand(layer.weight.shape, generator=generator) * 4 - 2)
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * spread
                               * scale)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * scale * 10)
    return model.to(dtype).eval()


def _exact_dual(model: nn.Sequential, box: Box, boxes: dict[int, Box],
                multipliers: dict[int, Tensor]) -> Fraction:
    """The dual bound of ``f(x)`` (one output) in exact rational arithmetic, for the lowered
    ops [Linear, ReLU(1), Linear, ReLU(3), Linear]."""
    layers = [model[0], model[2], model[4]]
    W = [_fractions(layer.weight) for layer in layers]
    b = [[Fraction(v) for v in layer.bias.detach().double().tolist()] for layer in layers]
    A = [Fraction(1)]
    value = Fraction(0)
    for position, relu in ((2, 3), (1, 1), (0, None)):
        value += sum((a * c for a, c in zip(A, b[position], strict=True)), Fraction(0))
        rho = _vecmat(A, W[position])
        if relu is None:
            low = [Fraction(v) for v in box.lower[0].double().tolist()]
            high = [Fraction(v) for v in box.upper[0].double().tolist()]
            value += sum((min(r * lo, r * hi) for r, lo, hi in zip(rho, low, high, strict=True)),
                         Fraction(0))
            return value
        lam = [Fraction(v) for v in multipliers[relu][0, 0].double().tolist()]
        low = [Fraction(v) for v in boxes[relu].lower[0].double().tolist()]
        high = [Fraction(v) for v in boxes[relu].upper[0].double().tolist()]
        for r, m, lo, hi in zip(rho, lam, low, high, strict=True):
            candidates = [r * max(lo, Fraction(0)) - m * lo, r * max(hi, Fraction(0)) - m * hi]
            if lo < 0 < hi:
                candidates.append(Fraction(0))
            value += min(candidates)
        A = lam
    raise AssertionError("unreachable")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(8))
def test_the_rigorous_values_never_exceed_their_exact_counterparts(
    dtype: torch.dtype, seed: int
) -> None:
    """The dual bound and the interval bound, each computed in floating point with its error
    subtracted, against the same bound in exact rational arithmetic (same boxes, same
    multipliers), on nets whose weights span four orders of magnitude and whose scale and
    input box range over 1e-3..1e12."""
    generator = torch.Generator().manual_seed(seed)
    scale = 10.0 ** float(torch.randint(-3, 8, (), generator=generator))
    model = _mlp(generator, dtype, scale)
    size = 10.0 ** float(torch.randint(-3, 12, (), generator=generator))
    center = (torch.randn(1, 4, generator=generator) * size).to(dtype)
    box = Box(center - size, center + size)
    net = lower(model, box.center)
    boxes = {i: rounding(net, box).widen(i, b)
             for i, b in pre_activation_bounds(net, box).boxes.items()}
    C = torch.ones(1, 1, 1, dtype=dtype)
    found = optimise_split_bound(net, box, C, boxes, {}, steps=2)
    for multipliers in (found.pre_coefficients,
                        {i: torch.randn(1, 1, *net.shapes[i], generator=generator).to(dtype)
                         * float(found.pre_coefficients[i].abs().max() + 1)
                         for i in net.relu_indices}):
        value = float(dual_lower(net, box, C, boxes, multipliers))
        exact = _exact_dual(model, box, boxes, multipliers)
        assert value == -math.inf or Fraction(value) <= exact, (value, float(exact))
    value = float(sound_interval(net, box, C))
    W = [_fractions(layer.weight) for layer in (model[0], model[2], model[4])]
    biases = [[Fraction(v) for v in layer.bias.detach().double().tolist()]
              for layer in (model[0], model[2], model[4])]
    low = [Fraction(v) for v in box.lower[0].double().tolist()]
    high = [Fraction(v) for v in box.upper[0].double().tolist()]
    for position in range(2):  # exact interval arithmetic through both hidden layers
        c = [(lo + hi) / 2 for lo, hi in zip(low, high, strict=True)]
        r = [(hi - lo) / 2 for lo, hi in zip(low, high, strict=True)]
        mid = [m + bias for m, bias in zip(_matvec(W[position], c), biases[position],
                                           strict=True)]
        spread = _matvec([[abs(w) for w in row] for row in W[position]], r)
        low = [max(m - s, Fraction(0)) for m, s in zip(mid, spread, strict=True)]
        high = [max(m + s, Fraction(0)) for m, s in zip(mid, spread, strict=True)]
    exact = biases[2][0] + sum((min(w * lo, w * hi) for w, lo, hi in zip(W[2][0], low, high,
                                                                          strict=True)),
                               Fraction(0))
    assert value == -math.inf or Fraction(value) <= exact, (value, float(exact))
