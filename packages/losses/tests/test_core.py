"""Robust cross-entropy, the result type, input checks and the registry."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from tightrope.losses import (
    METHODS,
    CCIBPConfig,
    CROWNIBPConfig,
    ExpIBPConfig,
    IBPConfig,
    IBPLoss,
    LossOutput,
    MTLIBPConfig,
    SABRConfig,
    build_loss,
    logit_margins,
    robust_cross_entropy,
)

from .conftest import batch, small_mlp


def test_robust_ce_of_exact_margins_is_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(32, 7, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 7, (32,), generator=generator)
    per_sample = robust_cross_entropy(logit_margins(logits, y))
    expected = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(per_sample, expected, rtol=1e-12, atol=1e-12)


def test_robust_ce_hand_values_and_stability() -> None:
    lower = torch.tensor([[0.0], [math.log(3.0)], [1000.0], [-1000.0]], dtype=torch.float64)
    values = robust_cross_entropy(lower)
    expected = torch.tensor([math.log(2.0), math.log(4.0 / 3.0), 0.0, 1000.0],
                            dtype=torch.float64)
    torch.testing.assert_close(values, expected, rtol=1e-12, atol=1e-12)
    two = robust_cross_entropy(torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(
        two, torch.tensor([math.log(1 + math.exp(-1) + math.exp(-2))], dtype=torch.float64)
    )


def test_robust_ce_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"\(B, K-1\)"):
        robust_cross_entropy(torch.zeros(3))


def test_loss_output_is_frozen_and_metrics_detached() -> None:
    model = small_mlp(0)
    x, y = batch(1, (8, 6), 4)
    out = IBPLoss()(model, x, y, 0.05)
    assert isinstance(out, LossOutput)
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.loss = torch.zeros(())  # type: ignore[misc]
    assert out.logits.shape == (8, 4)
    assert out.loss.requires_grad
    for name, value in out.metrics.items():
        assert isinstance(value, torch.Tensor), name
        assert value.dim() == 0, name
        assert not value.requires_grad, name


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: CCIBPConfig(alpha=1.5), "alpha"),
        (lambda: MTLIBPConfig(alpha=-0.1), "alpha"),
        (lambda: ExpIBPConfig(alpha=2.0), "alpha"),
        (lambda: CROWNIBPConfig(beta=1.1), "beta"),
        (lambda: CROWNIBPConfig(kappa=-1.0), "kappa"),
        (lambda: IBPConfig(kappa=3.0), "kappa"),
        (lambda: SABRConfig(shrink=0.0), "shrink"),
    ],
)
def test_configs_reject_bad_values(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


def test_losses_reject_bad_batches() -> None:
    model = small_mlp(0)
    x, y = batch(1, (8, 6), 4)
    loss = IBPLoss()
    with pytest.raises(ValueError, match="eps"):
        loss(model, x, y, -0.1)
    with pytest.raises(ValueError, match=r"y must have shape"):
        loss(model, x, y[:3], 0.1)
    with pytest.raises(TypeError, match="integer"):
        loss(model, x, y.double(), 0.1)
    with pytest.raises(TypeError, match="floating"):
        loss(model, (x > 0.5).long(), y, 0.1)


def test_randomised_losses_need_a_generator() -> None:
    model = small_mlp(0)
    x, y = batch(1, (8, 6), 4)
    for name in ("cc_ibp", "mtl_ibp", "exp_ibp", "sabr", "pgd", "taps", "staps"):
        with pytest.raises(ValueError, match=r"[Gg]enerator"):
            build_loss(name)(model, x, y, 0.1)


def test_registry() -> None:
    assert set(METHODS) == {
        "standard", "pgd", "ibp", "crown_ibp", "sabr", "cc_ibp", "mtl_ibp", "exp_ibp", "taps",
        "staps", "lee", "wong_kolter",
    }
    model = small_mlp(0)
    x, y = batch(1, (8, 6), 4)
    for name, method in METHODS.items():
        loss = method.default(torch.Generator().manual_seed(0))
        out = loss(model, x, y, 0.05)
        assert torch.isfinite(out.loss), name
    assert isinstance(build_loss("mtl_ibp", MTLIBPConfig(alpha=0.3)), object)
    with pytest.raises(ValueError, match="known: "):
        build_loss("ibpp")
    with pytest.raises(TypeError, match="MTLIBPConfig"):
        build_loss("mtl_ibp", CCIBPConfig())
