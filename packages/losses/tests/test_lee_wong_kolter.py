"""Lee et al. 2021 (CROWN-IBP with 0/1 slopes from a signed-gradient step) and Wong & Kolter
2018 (the dual network's bound)."""

from __future__ import annotations

import pytest
import torch

from tightrope.bounds import Box, Intermediate, LowerSlope, crown, margin_spec, relax
from tightrope.losses import (
    METHODS,
    LeeConfig,
    LeeLoss,
    WongKolterLoss,
    build_loss,
    robust_cross_entropy,
    signed_step_slopes,
)

from .conftest import batch, small_cnn, small_mlp


def test_signed_step_by_hand() -> None:
    start = (torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0]),)
    grads = (torch.tensor([-2.0, 3.0, -0.1, 0.5, 0.0]),)
    (slopes,) = signed_step_slopes(start, grads)
    assert slopes.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("seed", range(4))
def test_lee_uses_the_signed_gradient_slopes_of_its_own_loss(seed: int) -> None:
    model = small_mlp(seed).eval()
    x, y = batch(seed, (8, 6), 4)
    eps = 0.15
    out = LeeLoss()(model, x, y, eps)
    box, C = Box.from_linf(x, eps), margin_spec(y, 4, dtype=x.dtype)
    relaxed = relax(model, box, C, intermediate=Intermediate.IBP)
    assert any(bool(u.any()) for u in relaxed.unstable), "the test needs unstable neurons"
    start = [s.clone().requires_grad_(True) for s in relaxed.default_slopes]
    robust_cross_entropy(relaxed.lower(start)).mean().backward()
    chosen = []
    for s, unstable in zip(start, relaxed.unstable, strict=True):
        assert s.grad is not None
        picked = torch.where(s.grad < 0, 1.0, torch.where(s.grad > 0, 0.0, s.detach()))
        assert bool(((picked == 0) | (picked == 1))[unstable].all())
        chosen.append(picked)
    expected = robust_cross_entropy(relaxed.lower(chosen)).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
    # Any slopes in [0, 1] are sound: the bound is below sampled margins.
    generator = torch.Generator().manual_seed(seed)
    samples = box.lower + torch.rand((64, *box.shape), generator=generator,
                                     dtype=x.dtype) * (box.upper - box.lower)
    with torch.no_grad():
        logits = model(samples.flatten(0, 1)).view(64, 8, 4)
        margins = torch.einsum("bkn,sbn->sbk", C, logits)
        lower = relaxed.lower(chosen)
    assert bool((margins >= lower - 1e-9).all())


def test_lee_kappa_mixes_the_natural_loss() -> None:
    model = small_mlp(7).eval()
    x, y = batch(1, (6, 6), 4)
    robust = LeeLoss()(model, x, y, 0.1)
    mixed = LeeLoss(LeeConfig(kappa=0.25))(model, x, y, 0.1)
    natural = torch.nn.functional.cross_entropy(model(x), y)
    torch.testing.assert_close(mixed.loss, 0.25 * natural + 0.75 * robust.loss)
    with pytest.raises(ValueError, match="kappa"):
        LeeConfig(kappa=1.5)


@pytest.mark.parametrize("seed", range(3))
def test_wong_kolter_is_robust_ce_of_the_parallel_slope_bound(seed: int) -> None:
    model = small_mlp(seed).eval()
    x, y = batch(seed, (5, 6), 4)
    out = WongKolterLoss()(model, x, y, 0.1)
    C = margin_spec(y, 4, dtype=x.dtype)
    lower = crown(model, Box.from_linf(x, 0.1), C, intermediate=Intermediate.CROWN,
                  lower_slope=LowerSlope.PARALLEL).lower
    torch.testing.assert_close(out.loss, robust_cross_entropy(lower).mean(), rtol=1e-12,
                               atol=1e-12)
    assert float(out.metrics["verified_accuracy"]) == float((lower > 0).all(1).double().mean())


@pytest.mark.parametrize("name", ["lee", "wong_kolter"])
def test_registered_and_differentiable_with_batchnorm(name: str) -> None:
    assert name in METHODS
    model = small_cnn(3)
    x, y = batch(2, (4, 1, 8, 8), 3)
    out = build_loss(name)(model, x, y, 0.05)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads if g is not None)
