"""beta-CROWN on graphs (residual joins, max pooling): split bounds are sound on every point of
their subdomain, equal CROWN without splits, and the certified dual at the search's multipliers
never exceeds the truth and stays close to the search's value."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from tightrope.bounds import (
    Box,
    apply_splits,
    certified_split_bound,
    margin_spec,
    optimise_pre_activations,
    optimise_split_bound,
    split_lower_bound,
)
from tightrope.bounds.graph import box_relaxations, graph_interval, output_bounds
from tightrope.bounds.graph_certificate import graph_certified_root
from tightrope.bounds.network import Network, lower

from .test_graph import DTYPE, _randomise, _samples, _tiny_models


def _setup(which: int, seed: int) -> tuple[nn.Module, Network, Box, Tensor, dict[int, Box]]:
    generator = torch.Generator().manual_seed(1000 * which + seed)
    model = _randomise(_tiny_models(generator)[which].to(DTYPE), generator)
    x = torch.rand((1, 1, 6, 6), generator=generator, dtype=DTYPE)
    box = Box.from_linf(x, 0.08)
    net = lower(model, box.center)
    assert not net.is_relu_chain
    root = graph_certified_root(net, box, rows=2)
    C = margin_spec(torch.tensor([1]), 3).to(DTYPE)
    return model, net, box, C, root.boxes


def _pre_values(net: Network, points: Tensor) -> dict[int, Tensor]:
    """The input of every relaxed op at each of ``points: (N, *S_in)``."""
    found: dict[int, Box] = {}
    graph_interval(net, Box(points, points), found=found)
    return {i: b.lower for i, b in found.items()}


def _random_splits(net: Network, boxes: dict[int, Box], domains: int,
                   generator: torch.Generator) -> dict[int, Tensor]:
    """Up to three splits of unstable ReLU neurons per subdomain, random phases."""
    signs: dict[int, Tensor] = {}
    for index in net.relu_indices:
        box = boxes[index]
        unstable = ((box.lower < 0) & (box.upper > 0)).expand(domains, *box.lower.shape[1:])
        pick = torch.rand(unstable.shape, generator=generator) < 3.0 / max(
            1, int(unstable[0].sum()) * len(net.relu_indices))
        phase = torch.where(torch.rand(unstable.shape, generator=generator) < 0.5, 1, -1)
        signs[index] = torch.where(unstable & pick, phase, 0).to(torch.int8)
    return signs


def _clamped(boxes: dict[int, Box], signs: dict[int, Tensor], domains: int) -> dict[int, Box]:
    """The root ``boxes`` repeated for ``domains`` subdomains, clamped to their ``signs``."""
    return apply_splits({i: Box(b.lower.expand(domains, *b.lower.shape[1:]),
                                b.upper.expand(domains, *b.upper.shape[1:]))
                         for i, b in boxes.items()}, signs)


CASES = [(which, seed) for which in range(2) for seed in range(3)]


@pytest.mark.parametrize(("which", "seed"), CASES)
def test_graph_split_bound_without_splits_is_crown(which: int, seed: int) -> None:
    _, net, box, C, boxes = _setup(which, seed)
    found = split_lower_bound(net, box, C, boxes, {})
    relaxations = box_relaxations(net, boxes)
    crown = output_bounds(net, box, C, relaxations, upper=False).lower
    assert torch.allclose(found.lower, crown, atol=1e-10)
    assert set(found.pre_coefficients) == set(net.relu_indices)


@pytest.mark.parametrize(("which", "seed"), CASES)
def test_graph_split_bounds_hold_on_every_point_of_their_subdomain(which: int, seed: int
                                                                   ) -> None:
    model, net, box, C, boxes = _setup(which, seed)
    generator = torch.Generator().manual_seed(seed + 7)
    domains = 6
    signs = _random_splits(net, boxes, domains, generator)
    clamped = _clamped(boxes, signs, domains)
    rows = C.expand(domains, *C.shape[1:])
    found = optimise_split_bound(net, box, rows, clamped, signs, steps=15)
    _, sound = certified_split_bound(net, box, rows, clamped, signs, search=net, steps=15)
    points = _samples(box, 3000, generator)[0]
    pre = _pre_values(net, points)
    with torch.no_grad():
        values = model(points) @ C[0].T  # (N, K)
    checked = 0
    for d in range(domains):
        inside = torch.ones(points.shape[0], dtype=torch.bool)
        for index, sign in signs.items():
            s = sign[d].flatten().to(DTYPE)
            z = pre[index].flatten(1)
            inside &= ((s * z) >= 0).all(dim=1)
        if not bool(inside.any()):
            continue
        least = values[inside].min(dim=0).values
        assert bool((found.lower[d] <= least + 1e-9).all())
        assert bool((sound[d] <= least + 1e-9).all())
        # The certified value loses only rounding to the search's (both in float64 here).
        assert bool((sound[d] >= found.lower[d] - 1e-7).all())
        checked += 1
    assert checked > 0


@pytest.mark.parametrize(("which", "seed"), CASES)
def test_graph_beta_multipliers_only_tighten_a_split_bound(which: int, seed: int) -> None:
    _, net, box, C, boxes = _setup(which, seed)
    generator = torch.Generator().manual_seed(seed + 11)
    domains = 4
    signs = _random_splits(net, boxes, domains, generator)
    clamped = _clamped(boxes, signs, domains)
    rows = C.expand(domains, *C.shape[1:])
    start = split_lower_bound(net, box, rows, clamped, signs)
    best = optimise_split_bound(net, box, rows, clamped, signs, steps=20)
    assert bool((best.lower >= start.lower - 1e-9).all())


@pytest.mark.parametrize(("which", "seed"), CASES)
def test_optimised_intermediate_bounds_on_graphs_are_sound_and_tighter(which: int, seed: int
                                                                        ) -> None:
    _, net, box, _, boxes = _setup(which, seed)
    tight = optimise_pre_activations(net, box, boxes, steps=10, search=net)
    generator = torch.Generator().manual_seed(seed + 5)
    pre = _pre_values(net, _samples(box, 2000, generator)[0])
    for index, b in tight.items():
        assert bool((b.lower <= boxes[index].upper).all())
        assert bool((b.lower >= boxes[index].lower).all())
        assert bool((b.upper <= boxes[index].upper).all())
        z = pre[index]
        assert bool((z >= b.lower - 1e-9).all()), index
        assert bool((z <= b.upper + 1e-9).all()), index


@pytest.mark.parametrize(("which", "seed"), CASES[:3])
def test_a_float32_search_is_certified_in_float64(which: int, seed: int) -> None:
    model, net, box, C, boxes = _setup(which, seed)
    search = lower(copy.deepcopy(model).float(), box.center.float())
    generator = torch.Generator().manual_seed(seed + 3)
    domains = 5
    signs = _random_splits(net, boxes, domains, generator)
    clamped = _clamped(boxes, signs, domains)
    rows = C.expand(domains, *C.shape[1:])
    found, sound = certified_split_bound(net, box, rows, clamped, signs, search=search, steps=10)
    exact = optimise_split_bound(net, box, rows, clamped, signs, steps=0,
                                 alphas={i: a.double() for i, a in found.alphas.items()},
                                 betas={i: b.double() for i, b in found.betas.items()})
    assert found.lower.dtype == torch.float32
    assert sound.dtype == DTYPE
    # The dual at the float32 search's multipliers is as good as the float64 bound at its
    # slopes and betas, up to float32 rounding of the multipliers.
    assert bool((sound >= exact.lower - 1e-3).all())


@pytest.mark.parametrize(("which", "seed"), CASES[:3])
def test_graph_alpha_searched_in_float32_is_certified_in_float64(which: int, seed: int) -> None:
    from tightrope.bounds.graph_certificate import graph_alpha_bounds, graph_certified_bounds

    model, net, box, C, _ = _setup(which, seed)
    root = graph_certified_root(net, box, rows=int(C.shape[1]))
    search = lower(copy.deepcopy(model).float(), box.center.float())
    crown = graph_certified_bounds(net, box, C, root=root)
    alpha = graph_alpha_bounds(net, box, C, root, steps=20, search=search)
    assert alpha.dtype == DTYPE
    # Never worse than CROWN beyond the float32 search's slack; never above the truth.
    assert bool((alpha >= crown - 1e-4).all())
    points = _samples(box, 3000, torch.Generator().manual_seed(seed))[0]
    with torch.no_grad():
        values = model(points) @ C[0].T
    assert bool((alpha[0] <= values.min(dim=0).values + 1e-9).all())


@pytest.mark.parametrize(("which", "seed"), CASES)
def test_graph_split_bounds_never_pass_the_exact_milp_optimum_of_their_subdomain(
        which: int, seed: int) -> None:
    pytest.importorskip("scipy")
    from tightrope.bounds import MilpStatus, milp_search

    model, net, box, C, boxes = _setup(which, seed)
    generator = torch.Generator().manual_seed(seed + 13)
    domains = 4
    signs = _random_splits(net, boxes, domains, generator)
    for sign in signs.values():
        sign[0] = 0  # subdomain 0 is the whole box: never empty
    clamped = _clamped(boxes, signs, domains)
    rows = C[:, :1].expand(domains, 1, *C.shape[2:])
    _, sound = certified_split_bound(net, box, rows, clamped, signs, search=net, steps=15)
    checked = 0
    for d in range(domains):
        own = {i: Box(b.lower[d : d + 1], b.upper[d : d + 1]) for i, b in clamped.items()}
        if any(bool((b.lower > b.upper).any()) for b in own.values()):
            continue  # an empty subdomain: nothing to compare
        # The MILP over the subdomain (its clamped boxes encode the splits exactly): no input
        # reaches below the certified bound.
        below = milp_search(model, box, rows[d], sound[d] - 1e-6, boxes=own)
        assert below.status is not MilpStatus.FEASIBLE, d
        # Where the subdomain is not empty (some input has a value below 1000), the
        # comparison was a real one.
        above = milp_search(model, box, rows[d], torch.full_like(sound[d], 1e3), boxes=own)
        checked += above.status is MilpStatus.FEASIBLE
    assert checked > 0
