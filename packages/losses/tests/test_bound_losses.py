"""IBP, CROWN-IBP and SABR against direct computations with tightrope.bounds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tightrope.attacks import PGDConfig, pgd
from tightrope.bounds import Box, crown_ibp, ibp, margin_spec
from tightrope.losses import (
    CROWNIBPConfig,
    CROWNIBPLoss,
    IBPConfig,
    IBPLoss,
    SABRConfig,
    SABRLoss,
    SmallBoxRadius,
    robust_cross_entropy,
    small_box,
)
from tightrope.losses.sabr import shrunk_interval_bounds

from .conftest import batch, small_cnn, small_mlp

SEEDS = range(4)


def _direct(bound: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
            eps: float) -> torch.Tensor:
    C = margin_spec(y, 4, dtype=x.dtype)
    box = Box.from_linf(x, eps)
    if bound == "ibp":
        return ibp(model, box, C).lower
    return crown_ibp(model, box, C).lower


@pytest.mark.parametrize("seed", SEEDS)
def test_ibp_loss_is_robust_ce_of_ibp_margins(seed: int) -> None:
    model = small_mlp(seed)
    x, y = batch(seed + 100, (16, 6), 4)
    eps = 0.05 + 0.05 * seed
    out = IBPLoss()(model, x, y, eps)
    lower = _direct("ibp", model, x, y, eps)
    torch.testing.assert_close(out.loss, robust_cross_entropy(lower).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.metrics["ibp_verified_accuracy"],
                               (lower > 0).all(dim=1).double().mean())
    mixed = IBPLoss(IBPConfig(kappa=0.25))(model, x, y, eps)
    expected = 0.25 * F.cross_entropy(model(x), y) + 0.75 * robust_cross_entropy(lower).mean()
    torch.testing.assert_close(mixed.loss, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_crown_ibp_beta_one_uses_crown_ibp_and_zero_is_ibp(seed: int) -> None:
    model = small_mlp(seed)
    x, y = batch(seed + 200, (16, 6), 4)
    eps = 0.1
    crown_lower = _direct("crown_ibp", model, x, y, eps)
    ibp_lower = _direct("ibp", model, x, y, eps)
    # The two bounds must differ on these nets, or the comparisons below prove nothing.
    assert not torch.allclose(crown_lower, ibp_lower)
    at_one = CROWNIBPLoss(CROWNIBPConfig(beta=1.0))(model, x, y, eps)
    torch.testing.assert_close(
        at_one.loss, robust_cross_entropy(crown_lower).mean(), rtol=1e-12, atol=0
    )
    at_zero = CROWNIBPLoss(CROWNIBPConfig(beta=0.0))(model, x, y, eps)
    torch.testing.assert_close(at_zero.loss, IBPLoss()(model, x, y, eps).loss, rtol=0, atol=0)
    half = CROWNIBPLoss(CROWNIBPConfig(beta=0.3, kappa=0.5))(model, x, y, eps)
    robust = robust_cross_entropy(0.3 * crown_lower + 0.7 * ibp_lower).mean()
    expected = 0.5 * F.cross_entropy(model(x), y) + 0.5 * robust
    torch.testing.assert_close(half.loss, expected, rtol=1e-12, atol=0)
    # The mix reads its IBP bound off the CROWN-IBP pass; the gradients are those of the
    # two separate bounds.
    weights = list(model.parameters())
    for got, want in zip(torch.autograd.grad(half.loss, weights),
                         torch.autograd.grad(expected, weights), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_small_box_lies_inside_the_eps_box(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(64, 5, generator=generator, dtype=torch.float64)
    eps = 0.3 * torch.rand(64, 1, generator=generator, dtype=torch.float64)
    # Any point, also outside the ball: the centre is clamped into the admissible range.
    x_adv = x + 2 * eps * (2 * torch.rand(64, 5, generator=generator, dtype=torch.float64) - 1)
    outer = Box.from_linf(x, eps)
    for shrink in (0.05, 0.3, 0.7, 1.0):
        for radius in SmallBoxRadius:
            inner = small_box(x, x_adv, eps, shrink, radius=radius)
            assert bool((inner.lower >= outer.lower).all())
            assert bool((inner.upper <= outer.upper).all())
            assert bool((inner.lower <= inner.upper).all())
            # Everywhere, also at the domain's edges, the box has its full width 2 tau, or the
            # whole clipped box where that is narrower.
            clipped = outer.upper - outer.lower
            tau = shrink * (eps if radius is SmallBoxRadius.EPS else clipped / 2)
            torch.testing.assert_close(inner.upper - inner.lower,
                                       torch.minimum(2 * tau, clipped), rtol=0, atol=1e-15)


def test_small_box_keeps_an_inner_point_as_centre() -> None:
    x = torch.full((1, 3), 0.5, dtype=torch.float64)
    x_adv = x + torch.tensor([[0.05, -0.2, 0.0]], dtype=torch.float64)
    box = small_box(x, x_adv, 0.2, 0.25)
    torch.testing.assert_close(box.center, torch.tensor([[0.55, 0.35, 0.5]],
                                                        dtype=torch.float64))


@pytest.mark.parametrize("seed", SEEDS)
def test_sabr_reduces_to_ibp_at_shrink_one(seed: int) -> None:
    model = small_mlp(seed)
    x, y = batch(seed + 300, (16, 6), 4)
    eps = 0.1
    generator = torch.Generator().manual_seed(seed)
    sabr = SABRLoss(SABRConfig(shrink=1.0), generator)(model, x, y, eps)
    torch.testing.assert_close(sabr.loss, IBPLoss()(model, x, y, eps).loss, rtol=1e-12, atol=0)
    small = SABRLoss(SABRConfig(shrink=0.2), torch.Generator().manual_seed(seed))(
        model, x, y, eps)
    assert float(small.loss.detach()) < float(sabr.loss.detach())


def test_sabr_loss_is_ibp_on_the_small_box() -> None:
    model = small_mlp(7)
    x, y = batch(8, (16, 6), 4)
    eps, shrink = 0.1, 0.4
    attack = PGDConfig(steps=3, random_start=False, early_stop=False)
    out = SABRLoss(SABRConfig(shrink=shrink, attack=attack))(model, x, y, eps)
    x_adv = pgd(model, x, y, eps, config=attack).x_adv
    lower = ibp(model, small_box(x, x_adv, eps, shrink), margin_spec(y, 4, dtype=x.dtype)).lower
    torch.testing.assert_close(out.loss, robust_cross_entropy(lower).mean(), rtol=1e-12, atol=0)


def test_bound_losses_in_eval_mode_match_the_direct_bounds_on_a_cnn() -> None:
    model = small_cnn(3, classes=4).eval()
    x, y = batch(4, (8, 1, 8, 8), 4)
    out = IBPLoss()(model, x, y, 0.02)
    lower = _direct("ibp", model, x, y, 0.02)
    torch.testing.assert_close(out.loss, robust_cross_entropy(lower).mean(), rtol=1e-12, atol=0)


def test_sabr_relu_shrink_scales_only_unstable_upper_bounds() -> None:
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0], [1.0]]))
        model[0].bias.copy_(torch.tensor([0.0, 1.5]))   # pre-activations [-1, 1] and [0.5, 2.5]
        model[2].weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
        model[2].bias.zero_()
    box = Box.from_center_radius(torch.zeros(1, 1, dtype=torch.float64),
                                 torch.ones(1, 1, dtype=torch.float64))
    C = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64)
    with torch.no_grad():
        plain = shrunk_interval_bounds(model, box, C, 1.0)
        torch.testing.assert_close(plain.upper, ibp(model, box, C).upper)
        torch.testing.assert_close(plain.lower, ibp(model, box, C).lower)
        shrunk = shrunk_interval_bounds(model, box, C, 0.8)
    # Unstable neuron: [0, 1] -> [0, 0.8]; the stable one keeps [0.5, 2.5].
    assert float(shrunk.upper) == pytest.approx(0.8 + 2.5)
    assert float(shrunk.lower) == pytest.approx(0.0 + 0.5)


def test_sabr_relu_shrink_never_raises_the_loss() -> None:
    model = small_cnn(11).eval()  # eval: both calls see the same running statistics
    x, y = batch(4, (6, 1, 8, 8), 3)
    losses = []
    for factor in (1.0, 0.8):
        loss = SABRLoss(SABRConfig(relu_shrink=factor), torch.Generator().manual_seed(0))
        losses.append(loss(model, x, y, 0.1).loss)
    assert float(losses[1].detach()) <= float(losses[0].detach()) + 1e-12
    with pytest.raises(ValueError, match="relu_shrink"):
        SABRConfig(relu_shrink=0.0)
