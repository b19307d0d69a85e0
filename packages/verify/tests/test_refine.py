"""Per-neuron branch-and-bound on hidden-layer bounds (:mod:`tightrope.verify.refine`).

Sound: every pre-activation of 10^4 sampled points (box corners included) of random float64
MLPs lies within the refined bounds, and the refined bounds lie between alpha-CROWN's and the
exact (MILP) range of every neuron. Useful: on these small nets the searches close most of the
gap between alpha-CROWN's bounds and the exact ones. Wired in: the cascade with the refinement
on agrees with the MILP oracle.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from tightrope.bounds import (
    Box,
    lower,
    margin_spec,
    milp_bound,
    optimise_pre_activations,
    pre_activation_bounds,
)
from tightrope.verify import (
    BabConfig,
    InputSplit,
    VerifierConfig,
    VerifyStatus,
    robustness_spec,
    verify,
)
from tightrope.verify.refine import SplitRefinement, refine_by_splitting

DTYPE = torch.float64

pytest.importorskip("scipy")


def mlp(seed: int, inputs: int = 4, width: int = 10, depth: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    previous = inputs
    for _ in range(depth):
        layers += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    return nn.Sequential(*layers, nn.Linear(previous, 3)).to(DTYPE).eval()


def alpha_bounds(model: nn.Sequential, box: Box):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        net = lower(model, box.center)
        pre = dict(pre_activation_bounds(net, box).boxes)
    pre = optimise_pre_activations(net, box, pre, steps=20)
    return net, {i: Box(b.lower.detach(), b.upper.detach()) for i, b in pre.items()}


def sample(box: Box, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` points of ``box``: half of them corners, half uniform."""
    shape = (count // 2, *box.lower.shape[1:])
    corners = torch.where(torch.rand(shape, generator=generator, dtype=DTYPE) < 0.5,
                          box.lower, box.upper)
    uniform = box.lower + (box.upper - box.lower) * torch.rand(shape, generator=generator,
                                                               dtype=DTYPE)
    return torch.cat([corners, uniform])


def pre_activations(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every ReLU of ``model`` at ``x``."""
    found = []
    for module in model:
        if isinstance(module, nn.ReLU):
            found.append(x)
        x = module(x)
    return found


def box_of(seed: int, inputs: int = 4) -> Box:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(1, inputs, generator=generator, dtype=DTYPE)
    eps = 0.1 + 0.3 * float(torch.rand(1, generator=generator, dtype=DTYPE))
    return Box.from_linf(x, eps)


@pytest.mark.parametrize(("seed", "candidates"), [(s, 16 if s % 2 else 1) for s in range(6)])
def test_refined_bounds_hold_every_sampled_point(seed: int, candidates: int) -> None:
    model, box = mlp(seed, depth=4), box_of(seed)
    net, pre = alpha_bounds(model, box)
    report = SplitRefinement()
    refined = refine_by_splitting(net, box, pre, range(1, 4), time.monotonic() + 1.5,
                                  candidates=candidates, leaves_per_search=3 - 2 * (seed % 2),
                                  report=report)
    assert report.domains > 0
    points = sample(box, 10_000, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        values = pre_activations(model, points)
    for index, value in zip(net.relu_indices, values, strict=True):
        bounds, before = refined[index], pre[index]
        assert bool((value >= bounds.lower - 1e-9).all()), (seed, index)
        assert bool((value <= bounds.upper + 1e-9).all()), (seed, index)
        assert bool((bounds.lower >= before.lower).all())
        assert bool((bounds.upper <= before.upper).all())
    # Layer 0 (exact already) and layers not asked for are left alone.
    first, last = net.relu_indices[0], net.relu_indices[-1]
    refined_last = refine_by_splitting(net, box, pre, [0], time.monotonic() + 1.0)
    assert torch.equal(refined_last[first].lower, pre[first].lower)
    assert torch.equal(refined_last[last].upper, pre[last].upper)


def test_refinement_closes_most_of_the_gap_to_the_exact_bounds() -> None:
    """Bounds of the third ReLU layer: alpha-CROWN's, refined, and the MILP's exact range.

    The searches target unstable neurons and stop once one is shown stable, so the measure is
    the count of neurons left unstable beyond the exact count, plus the gap to the exact range
    on the neurons that are unstable in truth."""
    excess_before = excess_after = 0
    gap_before = gap_after = 0.0
    for seed in range(10, 16):
        model, box = mlp(seed, width=16, depth=3), box_of(seed)
        net, pre = alpha_bounds(model, box)
        refined = refine_by_splitting(net, box, pre, [1, 2], time.monotonic() + 2.0)
        index = net.relu_indices[2]
        prefix = nn.Sequential(*list(model)[:5])  # up to the third Linear layer
        exact = milp_bound(prefix, box)
        truly = (exact.lower < 0) & (exact.upper > 0)
        for bounds, name in ((pre[index], "before"), (refined[index], "after")):
            assert bool((bounds.lower <= exact.lower + 1e-6).all()), seed
            assert bool((bounds.upper >= exact.upper - 1e-6).all()), seed
            excess = int(((bounds.lower < 0) & (bounds.upper > 0)).sum() - truly.sum())
            gap = ((exact.lower - bounds.lower) + (bounds.upper - exact.upper))[truly]
            if name == "before":
                excess_before += excess
                gap_before += float(gap.sum())
            else:
                excess_after += excess
                gap_after += float(gap.sum())
    assert excess_before > 0, "alpha-CROWN was exact: the sample tests nothing"
    assert gap_before > 0
    print(f"excess unstable {excess_before} -> {excess_after}, gap {gap_before:.3f} -> "
          f"{gap_after:.3f}")
    assert excess_after <= 0.5 * excess_before, (excess_before, excess_after)
    assert gap_after <= 0.5 * gap_before, (gap_before, gap_after)


def test_refinement_argument_checks() -> None:
    model, box = mlp(0), box_of(0)
    net, pre = alpha_bounds(model, box)
    two = Box(box.lower.repeat(2, 1), box.upper.repeat(2, 1))
    with pytest.raises(ValueError, match="one sample"):
        refine_by_splitting(net, two, pre, [1], math.inf)
    with pytest.raises(ValueError, match="leaves_per_search"):
        refine_by_splitting(net, box, pre, [1], math.inf, leaves_per_search=0)
    with pytest.raises(ValueError, match="candidates"):
        refine_by_splitting(net, box, pre, [1], math.inf, candidates=0)
    with pytest.raises(ValueError, match="split_refine"):
        BabConfig(split_refine=1.0)


def test_cascade_with_refinement_agrees_with_milp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Robustness properties of 3-layer nets, attacks off: the cascade with a third of its time
    spent on refinement answers as the exact margins say, and a counterexample violates."""
    import tightrope.verify.cascade as cascade

    calls: list[int] = []

    def counted(*args: object, **kwargs: object) -> dict[int, Box]:
        calls.append(1)
        return refine_by_splitting(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cascade, "refine_by_splitting", counted)
    config = VerifierConfig(attack_restarts=0, strong_attack_restarts=0,
                            bab=BabConfig(batch_size=16, max_domains=20_000, split_refine=0.3,
                                          input_split=InputSplit.NEVER))
    seen = set()
    for seed in range(300, 310):
        model = mlp(seed, inputs=5, width=10, depth=3)
        generator = torch.Generator().manual_seed(seed)
        x = torch.rand(1, 5, generator=generator, dtype=DTYPE)
        eps = 0.2 + 0.6 * float(torch.rand(1, generator=generator, dtype=DTYPE))
        label = int(model(x).argmax())
        spec = robustness_spec(x, label, eps, 3)
        verdict = verify(model, spec, timeout=6.0, config=config)
        margins = milp_bound(model, Box.from_linf(x, eps),
                             margin_spec(torch.tensor([label]), 3), upper=False).lower
        holds = bool((margins > 0).all())
        assert verdict.status in (VerifyStatus.VERIFIED, VerifyStatus.FALSIFIED), (seed, verdict)
        assert (verdict.status is VerifyStatus.VERIFIED) == holds, (seed, verdict, holds)
        if verdict.status is VerifyStatus.FALSIFIED:
            assert verdict.counterexample is not None
            assert verdict.output is not None
            assert spec.violated_by(verdict.counterexample, verdict.output)
        seen.add(verdict.status)
    assert seen == {VerifyStatus.VERIFIED, VerifyStatus.FALSIFIED}, seen
    assert len(calls) >= 2, calls  # the refinement ran before branch-and-bound
