"""Bound computations per second on batched branch-and-bound subdomains (beta-CROWN).

Run with ``.venv/bin/python -m pytest benchmarks/test_verify_bab_speed.py --benchmark-only``
(not part of the test suite). A random 784-256-256-10 MLP (the VNN-COMP mnistfc 256x2 shape),
eps 0.03, root CROWN intermediate bounds, and ``D`` subdomains each with 8 random ReLU splits
and one specification row. Each group compares one beta-CROWN bound pass over the ``D``
subdomains (baseline), the same with 10 alpha/beta ascent steps, the CROWN refinement of the
second layer's pre-activation bounds, and a plain forward pass of ``D`` inputs; ``extra_info``
records subdomains per second.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from tightrope.bounds import (
    Box,
    apply_splits,
    lower,
    optimise_split_bound,
    pre_activation_bounds,
    refine_pre_activations,
    split_lower_bound,
)

DOMAINS = [64, 256, 1024]


def _problem(domains: int):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10)).eval()
    for layer in model:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=(2.0 / layer.in_features) ** 0.5)
    x = torch.rand(1, 784)
    box = Box.from_linf(x, 0.03)
    net = lower(model, box.center)
    with torch.no_grad():
        root = pre_activation_bounds(net, box).boxes
    generator = torch.Generator().manual_seed(1)
    pre, signs = {}, {}
    for index, bounds in root.items():
        unstable = ((bounds.lower < 0) & (bounds.upper > 0))[0].nonzero().flatten()
        sign = torch.zeros((domains, *bounds.lower.shape[1:]), dtype=torch.int8)
        for d in range(domains):
            chosen = unstable[torch.randperm(unstable.numel(), generator=generator)[:4]]
            sign[d, chosen] = torch.randint(0, 2, (chosen.numel(),), generator=generator,
                                            dtype=torch.int8) * 2 - 1
        signs[index] = sign
        pre[index] = Box(bounds.lower.expand_as(sign).clone(), bounds.upper.expand_as(sign).clone())
    clamped = apply_splits(pre, signs)
    C = torch.zeros(domains, 1, 10)
    C[:, 0, 3], C[:, 0, 5] = 1.0, -1.0
    return model, net, box, C, clamped, signs


def _run(benchmark, group: str, fn: Callable[[], object], domains: int, rounds: int,  # type: ignore[no-untyped-def]
         baseline: bool = False) -> None:
    benchmark.group = group
    benchmark.extra_info["baseline"] = baseline
    benchmark.extra_info["domains"] = domains
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["domains_per_second"] = domains / median if median else float("inf")


@pytest.mark.parametrize("domains", DOMAINS)
def test_beta_bound_pass(benchmark, domains: int) -> None:  # type: ignore[no-untyped-def]
    _, net, box, C, pre, signs = _problem(domains)

    def run() -> object:
        with torch.no_grad():
            return split_lower_bound(net, box, C, pre, signs)

    _run(benchmark, f"bab-d{domains}", run, domains, rounds=10, baseline=True)


@pytest.mark.parametrize("domains", DOMAINS)
def test_beta_bound_optimised(benchmark, domains: int) -> None:  # type: ignore[no-untyped-def]
    _, net, box, C, pre, signs = _problem(domains)
    _run(benchmark, f"bab-d{domains}",
         lambda: optimise_split_bound(net, box, C, pre, signs, steps=10), domains, rounds=3)


@pytest.mark.parametrize("domains", DOMAINS)
def test_refine_intermediate(benchmark, domains: int) -> None:  # type: ignore[no-untyped-def]
    _, net, box, _, pre, signs = _problem(domains)

    def run() -> object:
        with torch.no_grad():
            return refine_pre_activations(net, box, pre, signs, start_layer=0)

    _run(benchmark, f"bab-d{domains}", run, domains, rounds=3)


@pytest.mark.parametrize("domains", DOMAINS)
def test_forward(benchmark, domains: int) -> None:  # type: ignore[no-untyped-def]
    model, _, box, _, _, _ = _problem(domains)
    x = box.center.expand(domains, -1).contiguous()

    def run() -> object:
        with torch.no_grad():
            return model(x)

    _run(benchmark, f"bab-d{domains}", run, domains, rounds=20)
