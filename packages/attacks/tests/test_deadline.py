"""A deadline stops PGD and APGD between steps and restarts: the best point so far comes back."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from tightrope.attacks import APGDConfig, AttackResult, PGDConfig, apgd, pgd


class Counting(nn.Module):
    """A small classifier that counts its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.net(x)


def _inputs() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(4, 1, 4, 4, generator=generator), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize(("attack", "config", "passes"), [
    (pgd, PGDConfig(steps=50, restarts=5), 1),  # the start point only
    (apgd, APGDConfig(steps=50, restarts=5), 2),  # the start point and one step
])
def test_a_passed_deadline_stops_the_attack_after_its_first_step(
    attack: Callable[..., AttackResult], config: object, passes: int
) -> None:
    model, (x, y) = Counting(), _inputs()
    generator = torch.Generator().manual_seed(0)
    attack(model, x, y, 0.5, config=config, generator=generator)
    full = model.calls
    model.calls = 0
    result = attack(model, x, y, 0.5, config=config, generator=generator,
                    deadline=time.monotonic() - 1.0)
    assert model.calls == passes < full
    assert bool(((result.x_adv - x).abs() <= 0.5 + 1e-6).all())
