"""Every loss back-propagates finite gradients on a small CNN with BatchNorm, and leaves the
model's modes and flags as it found them."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch import nn

from tightrope.losses import METHODS, BatchNormPolicy

from .conftest import batch, small_cnn

# "standard" has one pass only, so no BatchNorm policy.
CASES = [
    (name, policy)
    for name in sorted(METHODS)
    for policy in BatchNormPolicy
    if name != "standard" or policy is BatchNormPolicy.CLEAN_BATCH
]


def _biases_before_batch_statistics(model: nn.Module) -> set[str]:
    layers = list(model.named_children())
    return {
        f"{name}.bias"
        for (name, layer), (_, following) in itertools.pairwise(layers)
        if getattr(layer, "bias", None) is not None
        and isinstance(following, nn.modules.batchnorm._BatchNorm)
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "policy"), CASES)
def test_finite_gradients(name: str, dtype: torch.dtype, policy: BatchNormPolicy) -> None:
    model = small_cnn(0, dtype=dtype, classes=4)
    x, y = batch(1, (16, 1, 8, 8), 4, dtype=dtype)
    method = METHODS[name]
    config = method.config_type()
    if any(f.name == "batchnorm" for f in dataclasses.fields(config)):
        config = dataclasses.replace(config, batchnorm=policy)
    loss = method.build(config, torch.Generator().manual_seed(0))
    out = loss(model, x, y, 0.05)
    assert out.loss.dtype == dtype
    assert out.loss.dim() == 0
    out.loss.backward()
    gradients = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in gradients.values())
    cancelled = _biases_before_batch_statistics(model)
    largest = max(float(g.abs().max()) for g in gradients.values() if g is not None)
    for n, g in gradients.items():
        assert g is not None
        if n in cancelled:
            # Batch statistics subtract the batch mean, so a bias right before BatchNorm has a
            # zero gradient in exact arithmetic (only rounding is left).
            assert float(g.abs().max()) <= 1e-4 * largest, n
        else:
            assert float(g.abs().sum()) > 0, n
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    for value in out.metrics.values():
        assert bool(torch.isfinite(value))
