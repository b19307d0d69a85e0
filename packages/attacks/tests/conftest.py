"""Shared fixtures of the tightrope.attacks tests: small float64 models and data on CPU."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The tests use tiny tensors; on a shared 2-core machine one thread avoids contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cluster_data(
    n: int, means: Tensor, generator: torch.Generator, spread: float = 0.12
) -> tuple[Tensor, Tensor]:
    """``n`` points around ``means: (K, d)`` clipped to ``[0, 1]``, with their labels."""
    y = torch.randint(0, means.shape[0], (n,), generator=generator)
    noise = torch.randn(n, means.shape[1], generator=generator, dtype=torch.float64)
    return (means[y] + spread * noise).clamp(0, 1), y


@pytest.fixture(scope="session")
def trained_mlp() -> tuple[nn.Module, Tensor, Tensor]:
    """A 10-64-64-4 ReLU MLP trained on four Gaussian clusters; 200 held-out samples."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    means = 0.25 + 0.5 * torch.rand(4, 10, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)  # only the test seeds the global RNG, for nn.Linear's initialisation
    model = nn.Sequential(
        nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    ).double()
    x, y = cluster_data(512, means, generator)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    x_test, y_test = cluster_data(200, means, generator)
    torch.set_num_threads(threads)
    return model.eval(), x_test, y_test
