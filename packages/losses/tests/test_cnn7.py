"""Every registered loss back-propagates finite gradients through CNN7 (Shi et al. 2021's
architecture: five conv-BN-ReLU blocks, Linear(512)-BN-ReLU, Linear(K)) in float32 and float64,
with the IBP initialisation of the training recipe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tightrope.bounds import Normalize
from tightrope.losses import METHODS, ibp_initialize


def cnn7(size: int, classes: int = 10, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    layers: list[nn.Module] = [Normalize([0.49, 0.48, 0.45], [0.25, 0.24, 0.26])]
    width = 3
    for out, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (128, 1)]:
        layers += [nn.Conv2d(width, out, 3, stride, 1), nn.BatchNorm2d(out), nn.ReLU()]
        width = out
    layers += [nn.Flatten(), nn.Linear(128 * (size // 2) ** 2, 512), nn.BatchNorm1d(512),
               nn.ReLU(), nn.Linear(512, classes)]
    model = nn.Sequential(*layers).to(dtype).train()
    ibp_initialize(model, torch.Generator().manual_seed(0))
    return model


def _cases() -> list[object]:
    cases: list[object] = []
    for name in sorted(METHODS):
        for dtype in (torch.float32, torch.float64):
            # The dual network needs a backward pass per layer through the whole conv stack
            # (about a minute even on 8x8 inputs): only in the slow run.
            marks = [pytest.mark.slow] if name == "wong_kolter" else []
            cases.append(pytest.param(name, dtype, marks=marks, id=f"{name}-{dtype}"))
    return cases


@pytest.mark.parametrize(("name", "dtype"), _cases())
def test_cnn7_gradients_are_finite(name: str, dtype: torch.dtype) -> None:
    size, batch = (8, 1) if name == "wong_kolter" else (16, 2)
    model = cnn7(size, dtype=dtype)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, size, size, dtype=dtype, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    loss = METHODS[name].default(torch.Generator().manual_seed(0))
    if name == "wong_kolter":
        model.eval()  # batch 1: BatchNorm needs running statistics
    out = loss(model, x, y, 2 / 255)
    assert out.loss.dtype == dtype
    assert bool(torch.isfinite(out.loss))
    out.loss.backward()
    gradients = [p.grad for p in model.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in gradients)
    assert sum(float(g.abs().sum()) for g in gradients if g is not None) > 0
