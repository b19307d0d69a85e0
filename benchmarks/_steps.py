"""The certified-training step the loss benchmarks time (``test_losses_step.py`` and
``loss_steps_interleaved.py``): CNN7 of Shi et al. 2021 (CIFAR shape 3x32x32, BatchNorm in train
mode, IBP initialisation), one batch, eps 2/255, the method with its paper defaults; loss,
backward, gradient clipping at norm 10, Adam step."""

from __future__ import annotations

from collections.abc import Callable

import torch
from _models import cnn7

from tightrope.losses import METHODS, ibp_initialize

EPS = 2 / 255


def loss_step(name: str, batch: int) -> Callable[[], None]:
    """One training step of method ``name`` on its own freshly initialised CNN7 and batch."""
    torch.manual_seed(0)
    model = cnn7().train()
    ibp_initialize(model, torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    loss = METHODS[name].default(torch.Generator().manual_seed(2))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = loss(model, x, y, EPS)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()

    return step
