"""Shared helpers of the tightrope.losses tests: small random models and batches on CPU."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny tensors; on a shared 2-core machine one thread avoids contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise(model: nn.Module, generator: torch.Generator, scale: float = 0.6) -> nn.Module:
    """Overwrite every parameter from ``generator`` (no global seeding in the tests either)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            if name.endswith("weight") and parameter.dim() > 1:
                fan_in = parameter[0].numel()
                parameter.copy_(noise * (2.0 / fan_in) ** 0.5 * scale / 0.6)
            else:
                parameter.copy_(0.1 * noise)
    return model


def small_mlp(seed: int, dtype: torch.dtype = torch.float64, classes: int = 4) -> nn.Module:
    """A 6-16-16-K ReLU MLP with parameters drawn from ``seed``."""
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, classes)
    ).to(dtype)
    return randomise(model, torch.Generator().manual_seed(seed))


def small_cnn(seed: int, dtype: torch.dtype = torch.float64, classes: int = 3) -> nn.Module:
    """A CNN3-shaped net with BatchNorm on ``(B, 1, 8, 8)`` inputs, in train mode."""
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 2 * 2, classes),
    ).to(dtype)
    return randomise(model, torch.Generator().manual_seed(seed)).train()


def batch(
    seed: int, shape: tuple[int, ...], classes: int, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """Inputs uniform in ``[0, 1]`` and random labels, drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=generator, dtype=dtype)
    y = torch.randint(0, classes, (shape[0],), generator=generator)
    return x, y
