"""beta-CROWN subdomain bounds: soundness by sampling, consistency with CROWN, the MILP oracle.

A subdomain fixes ReLU phases; sampled points of the input box that satisfy the phases (their
pre-activations have the fixed signs) must all satisfy ``C f(x) >= lower bound`` for every
choice of lower slopes in ``[0, 1]`` and multipliers ``beta >= 0``, including optimised ones.
Phases are taken from a sampled point so the subdomain is never empty.
"""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from torch import Tensor, nn

from tightrope.bounds import (
    Box,
    MilpStatus,
    apply_splits,
    crown,
    empty_subdomains,
    lower,
    milp_bound,
    milp_minimum,
    milp_search,
    optimise_pre_activations,
    optimise_split_bound,
    pre_activation_bounds,
    refine_pre_activations,
    split_lower_bound,
)

DTYPE = torch.float64


def mlp(seed: int, widths: tuple[int, ...] = (4, 10, 10, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).to(DTYPE).eval()


def pre_activations(model: nn.Sequential, x: Tensor) -> list[Tensor]:
    """Inputs of every ReLU of ``model`` at ``x: (N, n)``."""
    found = []
    for layer in model:
        if isinstance(layer, nn.ReLU):
            found.append(x)
        x = layer(x)
    return found


def subdomain(model: nn.Sequential, box: Box, seed: int, splits_per_layer: int = 3):
    """Network, CROWN bounds and random split signs taken from a sampled point's phases."""
    net = lower(model, box.center)
    pre = dict(pre_activation_bounds(net, box).boxes)
    generator = torch.Generator().manual_seed(seed)
    anchor = box.lower + torch.rand(box.shape, generator=generator, dtype=DTYPE) * (
        box.upper - box.lower
    )
    anchor_pre = pre_activations(model, anchor)
    signs = {}
    for (index, bounds), z in zip(pre.items(), anchor_pre, strict=True):
        unstable = ((bounds.lower < 0) & (bounds.upper > 0))[0].nonzero().flatten()
        chosen = unstable[torch.randperm(unstable.numel(), generator=generator)]
        chosen = chosen[:splits_per_layer]
        sign = torch.zeros(bounds.lower.shape, dtype=torch.int8)
        sign[0, chosen] = torch.where(z[0, chosen] >= 0, 1, -1).to(torch.int8)
        signs[index] = sign
    return net, pre, signs


def inside_points(model: nn.Sequential, box: Box, signs: dict[int, Tensor], count: int) -> Tensor:
    """Uniform points of ``box`` plus its vertices, filtered to those satisfying ``signs``."""
    generator = torch.Generator().manual_seed(1)
    shape = (count, *box.shape[1:])
    points = box.lower + torch.rand(shape, generator=generator, dtype=DTYPE) * (
        box.upper - box.lower
    )
    corners = torch.where(torch.rand(shape, generator=generator, dtype=DTYPE) < 0.5,
                          box.lower, box.upper)
    points = torch.cat([points, corners])
    keep = torch.ones(points.shape[0], dtype=torch.bool)
    for z, sign in zip(pre_activations(model, points), signs.values(), strict=True):
        keep &= ((z * sign.to(DTYPE)) >= 0).all(dim=1)
    return points[keep]


@pytest.mark.parametrize("seed", range(6))
def test_split_bound_is_sound_for_any_multipliers(seed: int) -> None:
    model = mlp(seed)
    box = Box.from_linf(torch.rand(1, 4, dtype=DTYPE), 0.3)
    C = torch.randn(1, 5, 3, dtype=DTYPE)
    net, pre, signs = subdomain(model, box, seed)
    clamped = apply_splits(pre, signs)
    assert not bool(empty_subdomains(clamped).any())
    generator = torch.Generator().manual_seed(seed)
    alphas = {i: torch.rand((1, 5, *b.shape[1:]), generator=generator, dtype=DTYPE)
              for i, b in pre.items()}
    betas = {i: 3 * torch.rand((1, 5, *b.shape[1:]), generator=generator, dtype=DTYPE)
             for i, b in pre.items()}
    fixed = split_lower_bound(net, box, C, clamped, signs, alphas, betas)
    optimised = optimise_split_bound(net, box, C, clamped, signs, steps=15)
    points = inside_points(model, box, signs, 4000)
    assert points.shape[0] > 10
    values = model(points) @ C[0].T
    for found in (fixed, optimised):
        assert bool((values >= found.lower - 1e-9).all())
    # The optimised bound starts from CROWN's slopes and zero betas and keeps the best.
    start = split_lower_bound(net, box, C, clamped, signs, None, None)
    assert bool((optimised.lower >= start.lower - 1e-12).all())


def test_no_splits_zero_steps_is_crown() -> None:
    model = mlp(3)
    box = Box.from_linf(torch.rand(2, 4, dtype=DTYPE), 0.2)
    C = torch.randn(2, 4, 3, dtype=DTYPE)
    net = lower(model, box.center)
    pre = dict(pre_activation_bounds(net, box).boxes)
    found = optimise_split_bound(net, box, C, pre, {}, steps=0)
    expected = crown(model, box, C, upper=False).lower
    torch.testing.assert_close(found.lower, expected)


def test_betas_tighten_a_split_bound() -> None:
    """Across seeds, optimising beta on split subdomains sometimes helps and never hurts."""
    gains = []
    for seed in range(6):
        model = mlp(seed, (4, 16, 16, 3))
        box = Box.from_linf(torch.rand(1, 4, dtype=DTYPE), 0.4)
        C = torch.randn(1, 2, 3, dtype=DTYPE)
        net, pre, signs = subdomain(model, box, seed, splits_per_layer=4)
        clamped = apply_splits(pre, signs)
        alpha_only = optimise_split_bound(net, box, C, clamped, signs, steps=30, lr_beta=1e-12)
        both = optimise_split_bound(net, box, C, clamped, signs, steps=30)
        gains.append(float((both.lower - alpha_only.lower).max()))
    assert max(gains) > 1e-6


@pytest.mark.parametrize("seed", range(4))
def test_refined_and_optimised_pre_activations_are_sound(seed: int) -> None:
    model = mlp(seed, (4, 12, 12, 12, 3))
    box = Box.from_linf(torch.rand(1, 4, dtype=DTYPE), 0.3)
    net, pre, signs = subdomain(model, box, seed)
    refined = refine_pre_activations(net, box, pre, signs, start_layer=0)
    optimised = optimise_pre_activations(net, box, pre, signs, steps=10)
    points = inside_points(model, box, signs, 4000)
    assert points.shape[0] > 10
    for index, z in zip(pre, pre_activations(model, points), strict=True):
        for found in (refined, optimised):
            assert bool((z >= found[index].lower - 1e-9).all())
            assert bool((z <= found[index].upper + 1e-9).all())
            # Never looser than the bounds they started from.
            assert bool((found[index].lower >= pre[index].lower - 1e-12).all())
            assert bool((found[index].upper <= pre[index].upper + 1e-12).all())


@pytest.mark.parametrize("seed", range(4))
def test_bounds_never_exceed_the_milp_minimum(seed: int) -> None:
    pytest.importorskip("scipy")
    model = mlp(seed)
    box = Box.from_linf(torch.rand(1, 4, dtype=DTYPE), 0.25)
    C = torch.randn(1, 3, 3, dtype=DTYPE)
    net = lower(model, box.center)
    pre = optimise_pre_activations(net, box, dict(pre_activation_bounds(net, box).boxes))
    found = optimise_split_bound(net, box, C, pre, {}, steps=20)
    exact = milp_bound(model, box, C, upper=False).lower
    assert bool((found.lower <= exact + 1e-7).all())


def test_milp_minimum_returns_its_minimisers() -> None:
    pytest.importorskip("scipy")
    model = mlp(5)
    box = Box.from_linf(torch.rand(1, 4, dtype=DTYPE), 0.3)
    C = torch.randn(1, 3, 3, dtype=DTYPE)
    answer = milp_minimum(model, box, C)
    assert bool(answer.solved.all())
    assert bool(box.contains(answer.minimiser, 1e-9).all())
    at_minimiser = (model(answer.minimiser) * C[0]).sum(dim=1)
    torch.testing.assert_close(at_minimiser, answer.value, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(answer.bound, answer.value, atol=1e-5, rtol=1e-6)
    exact = milp_bound(model, box, C, upper=False).lower[0]
    torch.testing.assert_close(answer.bound, exact, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_milp_search_decides_a_row_like_the_milp_minimum(seed: int) -> None:
    pytest.importorskip("scipy")
    model = mlp(10 + seed)
    box = Box.from_linf(torch.rand(1, 4, dtype=DTYPE), 0.3)
    C = torch.randn(1, 1, 3, dtype=DTYPE)
    minimum = float(milp_bound(model, box, C, upper=False).lower[0, 0])
    # Just below the minimum the row cannot be met; just above it, a witness exists.
    below = milp_search(model, box, C, torch.tensor([minimum - 0.05], dtype=DTYPE))
    assert below.status is MilpStatus.INFEASIBLE
    above = milp_search(model, box, C, torch.tensor([minimum + 0.05], dtype=DTYPE))
    assert above.status is MilpStatus.FEASIBLE
    assert above.point is not None
    assert bool(box.contains(above.point, 1e-9).all())
    assert float((model(above.point) * C[0]).sum()) <= minimum + 0.05 + 1e-6


@pytest.mark.parametrize("seed", range(6))
def test_milp_search_meets_every_row_at_once(seed: int) -> None:
    """A conjunction of rows: a found point meets all of them, and "infeasible" is never
    claimed where sampled points meet them all."""
    pytest.importorskip("scipy")
    model = mlp(20 + seed)
    box = Box.from_linf(torch.rand(1, 4, dtype=DTYPE), 0.3)
    C = torch.randn(1, 2, 3, dtype=DTYPE)
    minima = milp_bound(model, box, C, upper=False).lower[0]
    thresholds = minima + 0.3 * torch.rand(2, dtype=DTYPE)
    net = lower(model, box.center)
    boxes = optimise_pre_activations(net, box, dict(pre_activation_bounds(net, box).boxes))
    found = milp_search(model, box, C, thresholds, boxes=boxes)
    points = box.lower + (box.upper - box.lower) * torch.rand(4096, 4, dtype=DTYPE)
    sampled_hit = bool(((model(points) @ C[0].T) <= thresholds).all(dim=1).any())
    if found.status is MilpStatus.INFEASIBLE:
        assert not sampled_hit
    else:
        assert found.status is MilpStatus.FEASIBLE
        assert found.point is not None
        assert bool(((model(found.point) @ C[0].T)[0] <= thresholds + 1e-6).all())


def test_milp_search_checks_its_thresholds() -> None:
    pytest.importorskip("scipy")
    model = mlp(3)
    box = Box.from_linf(torch.rand(1, 4, dtype=DTYPE), 0.1)
    with pytest.raises(ValueError, match="one value per row"):
        milp_search(model, box, torch.randn(1, 2, 3, dtype=DTYPE), torch.zeros(3, dtype=DTYPE))


def test_milp_search_answers_unknown_once_its_deadline_has_passed() -> None:
    """Building the program counts against the deadline; HiGHS never starts after it."""
    pytest.importorskip("scipy")
    model = mlp(5)
    box = Box.from_linf(torch.rand(1, 4, dtype=DTYPE), 0.3)
    C = torch.randn(1, 1, 3, dtype=DTYPE)
    threshold = torch.tensor([1e6], dtype=DTYPE)  # met everywhere: a solve would say FEASIBLE
    assert milp_search(model, box, C, threshold).status is MilpStatus.FEASIBLE
    late = milp_search(model, box, C, threshold, deadline=time.monotonic() - 1.0)
    assert late.status is MilpStatus.UNKNOWN


def test_a_passed_deadline_stops_the_ascent_at_its_start() -> None:
    model = mlp(7)
    box = Box.from_linf(torch.rand(1, 4, dtype=DTYPE), 0.3)
    C = torch.randn(1, 3, 3, dtype=DTYPE)
    net = lower(model, box.center)
    pre = dict(pre_activation_bounds(net, box).boxes)
    start = optimise_split_bound(net, box, C, pre, {}, steps=0)
    stopped = optimise_split_bound(net, box, C, pre, {}, steps=50, deadline=0.0)
    ran = optimise_split_bound(net, box, C, pre, {}, steps=50)
    torch.testing.assert_close(stopped.lower, start.lower)
    assert bool((ran.lower >= start.lower - 1e-12).all())
    kept = optimise_pre_activations(net, box, pre, steps=50, deadline=0.0)
    for index, bounds in kept.items():
        assert bool((bounds.lower >= pre[index].lower - 1e-12).all())
        assert bool((bounds.upper <= pre[index].upper + 1e-12).all())
