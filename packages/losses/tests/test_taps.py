"""TAPS and STAPS: forward value = multi-estimator PGD margins, the gradient connector against its
formula, IBP <= TAPS <= attack margins, reduction to IBP at the output split, the default split,
STAPS's box, its ramp loss (SABR) and its ReLU shrink."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tightrope.attacks import MultiEstimatorConfig, PGDConfig, multi_estimator_box_pgd, pgd
from tightrope.bounds import Box, ibp, margin_spec
from tightrope.losses import (
    METHODS,
    IBPConfig,
    IBPLoss,
    SABRConfig,
    SABRLoss,
    SmallBoxRadius,
    STAPSConfig,
    STAPSLoss,
    TAPSConfig,
    TAPSLoss,
    build_loss,
    gradient_connector,
    logit_margins,
    robust_cross_entropy,
    scale_gradient,
    small_box,
    taps_bounds,
)
from tightrope.losses.sabr import shrunk_interval_bounds
from tightrope.losses.taps import resolve_split, taps_loss

from .conftest import batch, small_cnn, small_mlp


def _connector_grads(lower: Tensor, upper: Tensor, point: Tensor, c: float, grad: Tensor
                     ) -> tuple[Tensor, Tensor]:
    lower = lower.clone().requires_grad_(True)
    upper = upper.clone().requires_grad_(True)
    out = gradient_connector(lower, upper, point, c)
    assert torch.equal(out, point)
    d_lower, d_upper = torch.autograd.grad(out, (lower, upper), grad)
    return d_lower, d_upper


LOWER = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 2.0], dtype=torch.float64)
UPPER = torch.tensor([4.0, 4.0, 4.0, 4.0, 4.0, 3.0, 2.0], dtype=torch.float64)
POINT = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 0.5, 2.0], dtype=torch.float64)
GRAD = torch.tensor([1.0, 2.0, -1.0, 3.0, 0.5, -2.0, 4.0], dtype=torch.float64)


@pytest.mark.parametrize(
    ("c", "to_lower", "to_upper"),
    [
        # binary: all to the nearer bound, ties (middle, equal bounds) half each
        (0.0, [1, 1, 0.5, 0, 0, 1, 0.5], [0, 0, 0.5, 1, 1, 0, 0.5]),
        # linear: (upper - p) / w and (p - lower) / w
        (1.0, [1, 0.75, 0.5, 0.25, 0, 0.625, 0.5], [0, 0.25, 0.5, 0.75, 1, 0.375, 0.5]),
        # c = 0.5: max(0, 1 - d / 2) with d the distance to the bound (w = 4)
        (0.5, [1, 0.5, 0, 0, 0, 0.25, 0.5], [0, 0, 0, 0.5, 1, 0, 0.5]),
        (0.25, [1, 0, 0, 0, 0, 0, 0.5], [0, 0, 0, 0, 1, 0, 0.5]),
    ],
)
def test_connector_gradients_match_the_formula(
    c: float, to_lower: list[float], to_upper: list[float]
) -> None:
    d_lower, d_upper = _connector_grads(LOWER, UPPER, POINT, c, GRAD)
    expected_lower = GRAD * torch.tensor(to_lower, dtype=torch.float64)
    expected_upper = GRAD * torch.tensor(to_upper, dtype=torch.float64)
    torch.testing.assert_close(d_lower, expected_lower, rtol=0, atol=1e-12)
    torch.testing.assert_close(d_upper, expected_upper, rtol=0, atol=1e-12)


def test_connector_sends_nothing_to_the_point_and_half_on_equal_bounds() -> None:
    g = torch.Generator().manual_seed(0)
    lower = torch.randn(3, 5, generator=g, dtype=torch.float64)
    point = lower.clone().requires_grad_(True)
    for c in (0.0, 0.5, 1.0):
        d_lower, d_upper = _connector_grads(lower, lower, point, c, torch.ones_like(lower))
        assert torch.equal(d_lower, torch.full_like(lower, 0.5))
        assert torch.equal(d_upper, torch.full_like(lower, 0.5))
    upper = (lower + 1).requires_grad_(True)
    out = gradient_connector(lower, upper, point, 0.5)
    out.sum().backward()
    assert point.grad is None
    assert upper.grad is not None


def test_scale_gradient_scales_only_the_gradient() -> None:
    t = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    out = scale_gradient(t, 5.0)
    assert torch.equal(out, t.detach())
    (out * torch.tensor([1.0, 3.0], dtype=torch.float64)).sum().backward()
    assert torch.equal(t.grad, torch.tensor([5.0, 15.0], dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_taps_margins_are_the_multi_estimator_margins(seed: int) -> None:
    model = small_mlp(seed).eval()
    x, y = batch(seed + 10, (6, 6), 4)
    box = Box.from_linf(x, 0.1)
    split = 3
    bounds = taps_bounds(model, box, y, split, generator=torch.Generator().manual_seed(7))
    latent = ibp(model[:split], box)
    found = multi_estimator_box_pgd(
        model[split:], latent.lower, latent.upper, y, generator=torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(bounds.taps.detach(), found.margins, rtol=0, atol=1e-12)
    C = margin_spec(y, 4, dtype=x.dtype)
    torch.testing.assert_close(bounds.ibp, ibp(model, box, C).lower, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("split", [1, 3])
def test_taps_lies_between_ibp_and_attack_margins(seed: int, split: int) -> None:
    # IBP <= TAPS is soundness (IBP of f_C bounds every latent point). TAPS <= attack margins
    # holds because the latent box contains f_E(x) and f_E(x_adv) and PGD in it goes well below
    # them; PGD is no exact minimiser, so that side is empirical (fixed seeds, and more steps
    # than the training default, whose 8 steps can stop a hair above the clean margin).
    model = small_mlp(seed).eval()
    x, y = batch(seed + 20, (8, 6), 4)
    eps = 0.05
    bounds = taps_bounds(
        model, Box.from_linf(x, eps), y, split,
        estimators=MultiEstimatorConfig(steps=100, restarts=5),
        generator=torch.Generator().manual_seed(0),
    )
    taps = bounds.taps.detach()
    assert bool((bounds.ibp.detach() <= taps + 1e-12).all())
    assert bool((bounds.ibp.detach() < taps - 1e-6).any())  # not just IBP
    x_adv = pgd(model, x, y, eps, config=PGDConfig(steps=20, early_stop=False),
                generator=torch.Generator().manual_seed(1)).x_adv
    with torch.no_grad():
        assert bool((taps <= logit_margins(model(x), y) + 1e-12).all())
        assert bool((taps <= logit_margins(model(x_adv), y) + 1e-12).all())


@pytest.mark.parametrize("model_factory", [small_mlp, small_cnn])
def test_split_at_the_output_is_exactly_ibp(model_factory: object) -> None:
    assert callable(model_factory)
    model = model_factory(0)
    shape = (8, 6) if isinstance(model[0], nn.Linear) else (8, 1, 8, 8)
    classes = model[-1].out_features
    x, y = batch(3, shape, classes)
    taps = TAPSLoss(TAPSConfig(split=len(model)), torch.Generator().manual_seed(0))
    out = taps(model, x, y, 0.05)
    taps_grads = torch.autograd.grad(out.loss, list(model.parameters()))
    reference = IBPLoss(IBPConfig())(model, x, y, 0.05)
    ibp_grads = torch.autograd.grad(reference.loss, list(model.parameters()))
    assert torch.equal(out.loss, reference.loss)
    assert all(torch.equal(a, b) for a, b in zip(taps_grads, ibp_grads, strict=True))
    assert torch.equal(out.metrics["taps_accuracy"], reference.metrics["ibp_verified_accuracy"])


def test_loss_is_the_product_and_w_scales_only_the_taps_gradient() -> None:
    model = small_mlp(4).eval()
    x, y = batch(5, (8, 6), 4)

    def run(w: float) -> tuple[Tensor, list[Tensor], dict[str, Tensor]]:
        loss = TAPSLoss(TAPSConfig(split=3, taps_gradient_scale=w),
                        torch.Generator().manual_seed(0))
        out = loss(model, x, y, 0.05)
        return out.loss, list(torch.autograd.grad(out.loss, list(model.parameters()))), dict(
            out.metrics)

    loss1, grads1, metrics = run(1.0)
    loss5, grads5, _ = run(5.0)
    _, grads0, _ = run(0.0)
    torch.testing.assert_close(loss1, metrics["taps_loss"] * metrics["robust_loss"])
    assert torch.equal(loss1, loss5)
    # d(L_T L_I) with w: w L_I dL_T + L_T dL_I, so grads5 - grads0 = 5 (grads1 - grads0).
    for g1, g5, g0 in zip(grads1, grads5, grads0, strict=True):
        torch.testing.assert_close(g5 - g0, 5 * (g1 - g0))
    assert any(float((g1 - g0).abs().sum()) > 0 for g1, g0 in zip(grads1, grads0, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("split", [1, 2, 4, 7])
def test_taps_gradients_are_finite_and_reach_both_halves(dtype: torch.dtype, split: int) -> None:
    model = small_cnn(0, dtype=dtype, classes=4)
    x, y = batch(1, (16, 1, 8, 8), 4, dtype=dtype)
    loss = TAPSLoss(TAPSConfig(split=split), torch.Generator().manual_seed(0))
    out = loss(model, x, y, 0.05)
    assert out.loss.dtype == dtype
    out.loss.backward()
    # When every BatchNorm lies in the extractor, whose IBP pass normalises with the statistics
    # of the batch it propagates, a convolution's bias right before a BatchNorm cancels in the
    # batch mean: its gradient is zero in exact arithmetic (rounding may leave a trace), so it is
    # not asked for.
    in_classifier = any(isinstance(m, nn.BatchNorm2d) for m in model[split:])
    cancelled = set() if in_classifier else {"0.bias", "3.bias"}
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert bool(torch.isfinite(parameter.grad).all()), name
        if name not in cancelled:
            assert float(parameter.grad.abs().sum()) > 0, name
        else:
            assert float(parameter.grad.abs().max()) < 1e-4, name
    assert all(m.training for m in model.modules())


def test_connector_c_changes_the_extractor_gradient() -> None:
    # The TAPS term reaches f_E only through the connector, so its c changes f_E's gradient.
    model = small_mlp(6).eval()
    x, y = batch(7, (8, 6), 4)

    def extractor_grad(c: float) -> Tensor:
        # (At split 3, f_C = [ReLU, Linear], the estimators end on the box's corners, where
        # every c sends the same gradient: that split is IBP.)
        config = TAPSConfig(split=2, connector_c=c)
        out = TAPSLoss(config, torch.Generator().manual_seed(0))(model, x, y, 0.05)
        return torch.autograd.grad(out.loss, model[0].weight)[0]

    assert not torch.allclose(extractor_grad(0.0), extractor_grad(1.0))


def test_split_is_checked() -> None:
    model = small_mlp(0)
    x, y = batch(1, (4, 6), 4)
    for split in (0, -1):
        with pytest.raises(ValueError, match="split"):
            TAPSConfig(split=split)
    with pytest.raises(ValueError, match="split"):
        TAPSLoss(TAPSConfig(split=6), torch.Generator())(model, x, y, 0.1)
    with pytest.raises(ValueError, match="connector_c"):
        TAPSConfig(connector_c=1.5)

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = small_mlp(0)

        def forward(self, x: Tensor) -> Tensor:
            out: Tensor = self.body(x)
            return out

    with pytest.raises(TypeError, match=r"nn\.Sequential"):
        TAPSLoss(TAPSConfig(split=2), torch.Generator())(Wrapped(), x, y, 0.1)
    no_relu = nn.Sequential(nn.Linear(6, 4)).to(torch.float64)
    with pytest.raises(ValueError, match="no ReLU"):
        TAPSLoss(TAPSConfig(), torch.Generator())(no_relu, x, y, 0.1)


def test_default_split_leaves_one_relu_with_its_affine_layer() -> None:
    # The paper's split (reference block sizes "17 4" on CNN7): f_C = [Linear, BN, ReLU, Linear].
    cnn7_head = nn.Sequential(
        nn.Flatten(), nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4),
    )
    assert resolve_split(cnn7_head, None) == 4
    assert resolve_split(cnn7_head, None, classifier_relus=2) == 1
    assert resolve_split(small_mlp(0), None) == 2
    assert resolve_split(small_cnn(0), None) == 3  # [Conv, BN, ReLU, Flatten, Linear]
    assert resolve_split(cnn7_head, 7) == 7  # an explicit split wins
    with pytest.raises(ValueError, match="classifier_relus"):
        resolve_split(cnn7_head, None, classifier_relus=3)
    with pytest.raises(ValueError, match="extractor empty"):
        resolve_split(small_mlp(0), None, classifier_relus=2)
    with pytest.raises(ValueError, match="classifier_relus"):
        TAPSConfig(classifier_relus=0)

    model = small_mlp(0).eval()
    x, y = batch(2, (4, 6), 4)
    default = TAPSLoss(TAPSConfig(), torch.Generator().manual_seed(0))(model, x, y, 0.1)
    explicit = TAPSLoss(TAPSConfig(split=2), torch.Generator().manual_seed(0))(model, x, y, 0.1)
    assert torch.equal(default.loss, explicit.loss)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_taps_estimate_lies_strictly_between_ibp_and_pgd(seed: int) -> None:
    # The last hidden layer is active on the whole box, so f_C is affine on the latent box at
    # either split and the estimators (default settings) reach its exact minimiser, a corner.
    # Split before the last ReLU (f_C = [ReLU, Linear], separable and monotone) that minimum
    # is the IBP bound: TAPS collapses to IBP. With the affine layer in f_C (the default) IBP
    # loses the correlation through it and TAPS lies strictly above IBP, below the margins of
    # input-space PGD (the latent box holds f_E of every input).
    model = small_mlp(seed).eval()
    with torch.no_grad():
        model[2].bias.add_(6.0)
    x, y = batch(seed + 40, (16, 6), 4)
    eps = 0.1
    box = Box.from_linf(x, eps)
    assert bool((ibp(model[:3], box).lower > 0).all())
    config = TAPSConfig()
    split = resolve_split(model, config.split, config.classifier_relus)
    assert split == 2

    def estimate(at: int) -> tuple[Tensor, Tensor]:
        bounds = taps_bounds(model, box, y, at, estimators=config.estimators,
                             generator=torch.Generator().manual_seed(seed))
        return bounds.taps.detach(), bounds.ibp.detach()

    taps, ibp_lower = estimate(split)
    before_last_relu, ibp_again = estimate(3)
    torch.testing.assert_close(before_last_relu, ibp_again, rtol=0, atol=1e-9)
    x_adv = pgd(model, x, y, eps, config=PGDConfig(steps=50, restarts=3, early_stop=False),
                generator=torch.Generator().manual_seed(1)).x_adv
    with torch.no_grad():
        attack = torch.minimum(logit_margins(model(x_adv), y), logit_margins(model(x), y))
    assert bool((ibp_lower < taps - 1e-6).all())
    assert bool((taps <= attack + 1e-9).all())


def test_staps_trains_sabr_on_its_small_box_during_the_ramp() -> None:
    # The TAPS reference (mix_train.py, use_vanilla_ibp before end_epoch_eps) keeps the small
    # box during the ramp and propagates it with IBP through the whole net: SABR.
    model = small_cnn(3, classes=4).eval()  # eval: the calls see the same statistics
    x, y = batch(9, (8, 1, 8, 8), 4)
    eps = 0.1
    config = STAPSConfig(shrink=0.4, taps=TAPSConfig(relu_shrink=0.8))
    ramp = METHODS["staps"].build_ramp(config, torch.Generator().manual_seed(0))
    assert isinstance(ramp, SABRLoss)
    assert ramp.config == SABRConfig(shrink=0.4, attack=config.attack, relu_shrink=0.8,
                                     batchnorm=config.taps.batchnorm,
                                     radius=SmallBoxRadius.HALF_WIDTH)
    out = ramp(model, x, y, eps)
    reference = SABRLoss(config.ramp_config(), torch.Generator().manual_seed(0))(model, x, y, eps)
    assert torch.equal(out.loss, reference.loss)
    full_box = IBPLoss()(model, x, y, eps)
    assert float(out.loss.detach()) < float(full_box.loss.detach())
    # TAPS trains IBP on the eps box; every other method its own loss.
    taps_ramp = METHODS["taps"].build_ramp(TAPSConfig(), None)
    assert isinstance(taps_ramp, IBPLoss)
    assert torch.equal(taps_ramp(model, x, y, eps).loss, full_box.loss)
    assert isinstance(METHODS["sabr"].build_ramp(SABRConfig(), None), SABRLoss)
    with pytest.raises(TypeError):
        METHODS["staps"].build_ramp(TAPSConfig(), None)


def test_staps_applies_sabrs_relu_shrink_in_every_ibp_pass() -> None:
    model = small_mlp(5).eval()
    x, y = batch(6, (8, 6), 4)
    eps = 0.1
    shrunk = STAPSConfig(shrink=0.5, taps=TAPSConfig(relu_shrink=0.8))
    plain = STAPSConfig(shrink=0.5)
    assert plain.taps.relu_shrink == 1.0  # the paper's default: off
    out = STAPSLoss(shrunk, torch.Generator().manual_seed(0))(model, x, y, eps)
    base = STAPSLoss(plain, torch.Generator().manual_seed(0))(model, x, y, eps)
    assert float(out.metrics["robust_loss"]) < float(base.metrics["robust_loss"])

    generator = torch.Generator().manual_seed(0)
    x_adv = pgd(model, x, y, eps, config=shrunk.attack, generator=generator).x_adv
    box = small_box(x, x_adv, eps, shrunk.shrink, radius=shrunk.radius)
    bounds = taps_bounds(model, box, y, 2, estimators=shrunk.taps.estimators,
                         generator=generator, relu_shrink=0.8)
    C = margin_spec(y, 4, dtype=x.dtype)
    # The latent box and the classifier's IBP both shrink: together the whole net's shrunk IBP.
    torch.testing.assert_close(bounds.ibp, shrunk_interval_bounds(model, box, C, 0.8).lower,
                               rtol=1e-12, atol=1e-12)
    latent = shrunk_interval_bounds(model[:2], box, None, 0.8)
    assert bool((latent.upper <= ibp(model[:2], box).upper + 1e-12).all())
    torch.testing.assert_close(
        out.metrics["robust_loss"], robust_cross_entropy(bounds.ibp).mean().detach())
    with pytest.raises(ValueError, match="relu_shrink"):
        TAPSConfig(relu_shrink=0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_staps_is_taps_on_a_small_box_inside_the_eps_box(seed: int) -> None:
    model = small_mlp(seed).eval()
    x, y = batch(seed + 30, (8, 6), 4)
    eps = 0.1
    config = STAPSConfig(shrink=0.4, taps=TAPSConfig(split=3))
    out = STAPSLoss(config, torch.Generator().manual_seed(0))(model, x, y, eps)

    generator = torch.Generator().manual_seed(0)
    x_adv = pgd(model, x, y, eps, config=config.attack, generator=generator).x_adv
    box = small_box(x, x_adv, eps, config.shrink, radius=config.radius)
    eps_box = Box.from_linf(x, eps)
    assert bool((box.lower >= eps_box.lower - 1e-12).all())
    assert bool((box.upper <= eps_box.upper + 1e-12).all())
    assert bool(((box.upper - box.lower) < (eps_box.upper - eps_box.lower) - 1e-9).any())
    expected = taps_loss(model, x, y, box, config.taps, generator)
    assert torch.equal(out.loss, expected.loss)
    # A smaller box: the IBP term cannot grow.
    taps_out = TAPSLoss(config.taps, torch.Generator().manual_seed(0))(model, x, y, eps)
    assert float(out.metrics["robust_loss"]) <= float(taps_out.metrics["robust_loss"]) + 1e-12


def test_registry_builds_taps_and_staps() -> None:
    model = small_mlp(0)
    x, y = batch(1, (8, 6), 4)
    for name, config in (("taps", TAPSConfig(split=3)),
                         ("staps", STAPSConfig(taps=TAPSConfig(split=3)))):
        out = build_loss(name, config, torch.Generator().manual_seed(0))(model, x, y, 0.05)
        assert bool(torch.isfinite(out.loss))
    with pytest.raises(TypeError):
        build_loss("taps", STAPSConfig(), torch.Generator())


def test_split_by_layer_name_equals_split_by_index() -> None:
    from collections import OrderedDict

    from tightrope.losses.taps import resolve_split

    model = small_mlp(0)
    assert resolve_split(model, "2") == resolve_split(model, 2) == 2
    named = nn.Sequential(OrderedDict(
        [("features", nn.Linear(6, 8)), ("act", nn.ReLU()), ("head", nn.Linear(8, 4))]))
    assert resolve_split(named, "head") == 2
    with pytest.raises(ValueError, match=r"names no top-level layer.*features, act, head"):
        resolve_split(named, "tail")
    with pytest.raises(ValueError, match="first layer"):
        resolve_split(named, "features")
    with pytest.raises(ValueError, match="empty name"):
        TAPSConfig(split="")
