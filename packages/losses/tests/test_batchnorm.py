"""The BatchNorm policy: the clean batch's statistics in the later passes of a step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tightrope.attacks import fgsm
from tightrope.bounds import Box, ibp
from tightrope.losses import (
    BatchNormPolicy,
    IBPConfig,
    IBPLoss,
    MTLIBPConfig,
    MTLIBPLoss,
    clean_pass,
    expressive_attack,
)

from .conftest import batch, small_cnn


def _bn_model() -> nn.Module:
    layer = nn.BatchNorm1d(3).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return nn.Sequential(layer).train()


def test_clean_batch_statistics_normalise_later_passes() -> None:
    model = _bn_model()
    layer = model[0]
    x, _ = batch(0, (10, 3), 2)
    other, _ = batch(1, (6, 3), 2)
    other = 3 * other + 1
    with clean_pass(model, x, BatchNormPolicy.CLEAN_BATCH) as logits:
        inside = model(other)
        again = model(x)
    mean, var = x.mean(dim=0), x.var(dim=0, unbiased=False)
    expected = (other - mean) / torch.sqrt(var + layer.eps) * layer.weight + layer.bias
    torch.testing.assert_close(inside, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(again, logits, rtol=1e-12, atol=1e-12)
    with clean_pass(model, x, BatchNormPolicy.PER_PASS):
        own = model(other)
    mean, var = other.mean(dim=0), other.var(dim=0, unbiased=False)
    expected = (other - mean) / torch.sqrt(var + layer.eps) * layer.weight + layer.bias
    torch.testing.assert_close(own, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("policy", list(BatchNormPolicy))
def test_state_is_restored_and_running_statistics_move_once(policy: BatchNormPolicy) -> None:
    model = _bn_model()
    layer = model[0]
    x, _ = batch(0, (10, 3), 2)
    with clean_pass(model, x, policy):
        model(x + 0.5)
    assert layer.training
    assert isinstance(layer.running_mean, torch.Tensor)
    expected_mean = 0.9 * torch.zeros(3, dtype=torch.float64) + 0.1 * x.mean(dim=0)
    if policy is BatchNormPolicy.CLEAN_BATCH:
        torch.testing.assert_close(layer.running_mean, expected_mean)
        assert int(layer.num_batches_tracked) == 1
    else:
        assert int(layer.num_batches_tracked) == 2
    saved = layer.running_mean.clone()
    with pytest.raises(RuntimeError, match="boom"), clean_pass(
        model, x, BatchNormPolicy.CLEAN_BATCH
    ):
        raise RuntimeError("boom")
    assert layer.training
    assert not layer.running_mean.requires_grad
    assert not torch.equal(layer.running_mean, saved)  # one more clean pass was recorded


def test_bounds_under_clean_statistics_hold_for_the_clean_statistics_network() -> None:
    model = small_cnn(1)
    x, _y = batch(2, (8, 1, 8, 8), 3)
    eps = 0.05
    generator = torch.Generator().manual_seed(0)
    with clean_pass(model, x, BatchNormPolicy.CLEAN_BATCH):
        box = Box.from_linf(x, eps)
        bounds = ibp(model, box)
        for _ in range(20):
            u = torch.rand(x.shape, generator=generator, dtype=x.dtype)
            out = model(box.lower + u * (box.upper - box.lower))
            assert bool((out >= bounds.lower - 1e-10).all())
            assert bool((out <= bounds.upper + 1e-10).all())


def test_policies_agree_without_clipping_and_eval_mode_differs() -> None:
    model = small_cnn(4)
    x, y = batch(5, (8, 1, 8, 8), 3)
    x = 0.5 * x + 0.25  # away from the domain edges
    clean = IBPLoss()(model, x, y, 0.05).loss
    per_pass = IBPLoss(IBPConfig(batchnorm=BatchNormPolicy.PER_PASS))(
        model, x, y, 0.05).loss
    # Without clipping the box centre is x, so both normalise by the same statistics.
    torch.testing.assert_close(clean, per_pass, rtol=1e-10, atol=0)
    model.eval()
    a = IBPLoss()(model, x, y, 0.05).loss
    assert not torch.allclose(a, clean)


def test_adversarial_pass_uses_the_clean_statistics() -> None:
    # MTL-IBP at alpha = 0 is CE(f(x_adv), y); under CLEAN_BATCH f normalises x_adv by the
    # clean batch's statistics, under PER_PASS by the adversarial batch's own.
    # Every train-mode pass moves the running statistics the attack reads: fresh models.
    x, y = batch(7, (16, 1, 8, 8), 4)
    losses = {
        policy: MTLIBPLoss(MTLIBPConfig(alpha=0.0, batchnorm=policy),
                           torch.Generator().manual_seed(0))(
            small_cnn(6, classes=4), x, y, 0.2).loss
        for policy in BatchNormPolicy
    }
    directs = {}
    for policy in BatchNormPolicy:
        model = small_cnn(6, classes=4)
        x_adv = fgsm(model, x, y, 0.2, config=expressive_attack(),
                     generator=torch.Generator().manual_seed(0)).x_adv
        with clean_pass(model, x, policy):
            directs[policy] = F.cross_entropy(model(x_adv), y)
    assert not torch.allclose(*directs.values())
    for policy in BatchNormPolicy:
        torch.testing.assert_close(losses[policy], directs[policy], rtol=1e-12, atol=0)


@pytest.mark.parametrize("track", [True, False])
def test_ibp_loss_under_clean_statistics_is_ibp_of_the_frozen_network(track: bool) -> None:
    # Direct computation: a copy in eval mode whose running statistics are the clean batch's.
    model = small_cnn(8, classes=4)
    if not track:
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.track_running_stats = False
                layer.running_mean = None
                layer.running_var = None
    x, y = batch(9, (16, 1, 8, 8), 4)
    frozen = copy.deepcopy(model).eval()
    z = x
    for module, twin in zip(model, frozen, strict=True):
        if isinstance(module, nn.BatchNorm2d):
            twin.track_running_stats = True
            twin.running_mean = z.mean(dim=(0, 2, 3)).detach()
            twin.running_var = z.var(dim=(0, 2, 3), unbiased=False).detach()
        z = twin(z) if isinstance(module, nn.BatchNorm2d) else module(z)
    out = IBPLoss()(model, x, y, 0.03)
    expected = IBPLoss()(frozen, x, y, 0.03)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.logits, frozen(x), rtol=1e-10, atol=1e-12)
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            assert layer.training
            assert (layer.running_mean is None) is (not track)
