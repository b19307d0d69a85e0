"""Shi et al. 2021's initialisation and regularisers, L1, and the Regularized wrapper."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from tightrope.bounds import Box, Normalize, ibp_trace
from tightrope.losses import (
    CROWNIBPConfig,
    CROWNIBPLoss,
    IBPConfig,
    IBPLoss,
    Regularized,
    RegularizerConfig,
    SABRLoss,
    StandardLoss,
    TAPSConfig,
    TAPSLoss,
    WarmupConfig,
    WarmupLoss,
    ibp_initialize,
    l1_penalty,
    relu_balance_penalty,
    tightness_penalty,
)
from tightrope.losses.core import recording_pre_activations

from .conftest import batch, small_cnn, small_mlp


def test_ibp_initialize_draws_shis_scale_and_keeps_the_last_layer() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.Flatten(),
        nn.Linear(64 * 6 * 6, 512), nn.ReLU(), nn.Linear(512, 10),
    )
    last = model[6].weight.detach().clone()
    biases = [model[0].bias.detach().clone(), model[4].bias.detach().clone()]
    bn_weight = model[1].weight.detach().clone()
    ibp_initialize(model, torch.Generator().manual_seed(0))
    for layer, fan_in in ((model[0], 27), (model[4], 64 * 36)):
        expected = math.sqrt(2 * math.pi) / fan_in
        assert abs(float(layer.weight.detach().std()) / expected - 1) < 0.05
        assert abs(float(layer.weight.detach().mean())) < 0.05 * expected
    assert torch.equal(model[6].weight, last)
    assert torch.equal(model[0].bias, biases[0])
    assert torch.equal(model[4].bias, biases[1])
    assert torch.equal(model[1].weight, bn_weight)


def test_ibp_initialize_is_reproducible_and_checks_the_model() -> None:
    a, b = small_mlp(0), small_mlp(1)
    ibp_initialize(a, torch.Generator().manual_seed(5))
    ibp_initialize(b, torch.Generator().manual_seed(5))
    assert torch.equal(a[0].weight, b[0].weight)
    assert torch.equal(a[2].weight, b[2].weight)
    with pytest.raises(ValueError, match="at least two"):
        ibp_initialize(nn.Sequential(nn.Linear(3, 2)))


def test_l1_penalty_sums_weights_only() -> None:
    model = small_mlp(2)
    expected = sum(float(m.weight.detach().abs().sum()) for m in model if isinstance(m, nn.Linear))
    assert float(l1_penalty(model).detach()) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="no Linear"):
        l1_penalty(nn.Sequential(nn.ReLU()))


def _box(center: list[float], radius: float) -> Box:
    c = torch.tensor([center], dtype=torch.float64)
    return Box.from_center_radius(c, torch.full_like(c, radius))


def test_tightness_penalty_by_hand() -> None:
    # delta_0 = 0.1; layer widths 0.1 (ratio 1 -> 0) and 0.4 (ratio 1/4 -> (0.5 - 0.25)/0.5).
    pre = (_box([0.0, 1.0], 0.1), _box([0.0, 1.0], 0.4))
    value = tightness_penalty(torch.tensor(0.1, dtype=torch.float64), pre, tau=0.5)
    assert float(value) == pytest.approx((0.0 + 0.5) / 2)


def test_relu_balance_penalty_by_hand() -> None:
    balanced = _box([2.0, 2.0, -1.0, -1.0], 0.5)  # mean ratio 1/2, variance ratio 1: no penalty
    assert float(relu_balance_penalty((balanced,))) == pytest.approx(0.0)
    # centres (3, -1, -1, -1): mean ratio 1, variance ratio 9 / 3 -> 1/3: (0.5 - 1/3) / 0.5.
    skewed = _box([3.0, -1.0, -1.0, -1.0], 0.5)
    assert float(relu_balance_penalty((skewed,))) == pytest.approx(1 / 3)
    assert float(relu_balance_penalty((skewed, balanced))) == pytest.approx(1 / 6)
    # No dead neuron: the ratios are not finite and the layer adds nothing.
    assert float(relu_balance_penalty((_box([1.0, 2.0], 0.5),))) == 0.0


def test_regularized_with_zero_weights_is_the_loss() -> None:
    model = small_mlp(3).eval()
    x, y = batch(0, (5, 6), 4)
    base = IBPLoss()(model, x, y, 0.05)
    wrapped = Regularized(IBPLoss())(model, x, y, 0.05)
    assert torch.equal(wrapped.loss, base.loss)
    assert float(wrapped.metrics["regularizer"]) == 0.0


def test_regularized_adds_terms_from_the_losss_own_ibp_bounds() -> None:
    model = nn.Sequential(Normalize([0.5], [0.25]), *small_mlp(4)).double().eval()
    x, y = batch(1, (6, 6), 4)
    eps = 0.05
    config = RegularizerConfig(l1=1e-3, tightness=0.3, relu_balance=0.2)
    out = Regularized(IBPLoss(), config)(model, x, y, eps)
    box = Box.from_linf(x, eps)
    pre = ibp_trace(model, box).pre_activations
    delta_0 = (box.radius / 0.25).mean()
    expected = (
        IBPLoss()(model, x, y, eps).loss
        + 1e-3 * l1_penalty(model)
        + 0.3 * tightness_penalty(delta_0, pre)
        + 0.2 * relu_balance_penalty(pre)
    )
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
    for key in ("l1_penalty", "tightness_penalty", "relu_balance_penalty", "regularizer"):
        assert not out.metrics[key].requires_grad
    out.loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all())
               for p in model.parameters())


@pytest.mark.parametrize(
    "loss",
    [
        CROWNIBPLoss(CROWNIBPConfig(beta=1.0)),
        CROWNIBPLoss(CROWNIBPConfig(beta=0.5)),
        SABRLoss(generator=torch.Generator().manual_seed(0)),
        TAPSLoss(TAPSConfig(), generator=torch.Generator().manual_seed(0)),
    ],
    ids=["crown_ibp", "crown_ibp_mix", "sabr", "taps"],
)
def test_shi_terms_work_with_every_bound_based_loss(loss: object) -> None:
    model = small_cnn(5)
    x, y = batch(2, (4, 1, 8, 8), 3)
    config = RegularizerConfig(tightness=0.5, relu_balance=0.5)
    out = Regularized(loss, config)(model, x, y, 0.05)  # type: ignore[arg-type]
    assert float(out.metrics["tightness_penalty"]) >= 0
    assert bool(torch.isfinite(out.loss))
    out.loss.backward()


def test_shi_terms_need_a_bound_pass_and_valid_weights() -> None:
    model = small_mlp(6)
    x, y = batch(3, (4, 6), 4)
    with pytest.raises(ValueError, match="StandardLoss computes no IBP bounds"):
        Regularized(StandardLoss(), RegularizerConfig(tightness=0.1))(model, x, y, 0.1)
    # L1 alone works with any loss.
    out = Regularized(StandardLoss(), RegularizerConfig(l1=1e-4))(model, x, y, 0.1)
    assert float(out.metrics["l1_penalty"]) > 0
    with pytest.raises(ValueError, match="l1"):
        RegularizerConfig(l1=-1.0)
    with pytest.raises(ValueError, match="tau"):
        RegularizerConfig(tau=0.0)
    assert replace(RegularizerConfig(), tightness=0.25).tightness == 0.25


def test_warmup_loss_is_the_natural_loss_and_feeds_shis_terms_a_tiny_box() -> None:
    # Shi et al.'s code in the natural warm-up (eps 0): loss = CE + lambda (L_tight + L_relu)
    # with the bounds of a box of radius max(eps, 1e-6) (--min-eps-reg).
    x, y = batch(3, (16, 1, 8, 8), 3)
    natural = StandardLoss()(small_cnn(4), x, y, 0.0).loss
    alone = WarmupLoss()(small_cnn(4), x, y, 0.0)
    torch.testing.assert_close(alone.loss, natural, rtol=0, atol=0)
    config = RegularizerConfig(tightness=0.5, relu_balance=0.5)
    model = small_cnn(4)
    out = Regularized(WarmupLoss(), config)(model, x, y, 0.0)
    direct_model = small_cnn(4)
    with recording_pre_activations() as traces:
        direct = IBPLoss(IBPConfig(kappa=1.0))(direct_model, x, y, 1e-6)
    (box, pre), = traces
    assert float(box.radius.max()) == pytest.approx(1e-6)
    expected = direct.metrics["natural_loss"] + 0.5 * (
        tightness_penalty(box.radius.mean(), pre) + relu_balance_penalty(pre))
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.metrics["natural_loss"], natural.detach(), rtol=0, atol=0)
    assert float(out.metrics["regularizer"]) > 0
    # The terms reach the weights: the gradient differs from the natural loss's.
    out.loss.backward()
    natural_model = small_cnn(4)
    StandardLoss()(natural_model, x, y, 0.0).loss.backward()
    assert not torch.allclose(model[0].weight.grad, natural_model[0].weight.grad)
    # eps above the floor is used as it is.
    with recording_pre_activations() as traces:
        WarmupLoss(WarmupConfig(min_eps=1e-6))(small_cnn(4), x, y, 0.01)
    assert float(traces[0][0].radius.max()) == pytest.approx(0.01)
    with pytest.raises(ValueError, match=r"min_eps must lie in \(0, 1\]"):
        WarmupConfig(min_eps=0.0)
