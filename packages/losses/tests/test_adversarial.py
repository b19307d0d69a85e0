"""PGD adversarial training and the standard loss against direct computations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tightrope.attacks import PGDConfig, pgd
from tightrope.losses import PGDTrainingConfig, PGDTrainingLoss, StandardLoss

from .conftest import batch, small_mlp


def test_pgd_training_is_cross_entropy_at_the_pgd_point() -> None:
    model = small_mlp(3)
    x, y = batch(4, (16, 6), 4)
    eps = 0.2
    out = PGDTrainingLoss(generator=torch.Generator().manual_seed(1))(model, x, y, eps)
    attack = PGDTrainingConfig().attack
    x_adv = pgd(model, x, y, eps, config=attack, generator=torch.Generator().manual_seed(1)).x_adv
    expected = F.cross_entropy(model(x_adv), y)
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)
    clean = StandardLoss()(model, x, y, eps).loss
    assert float(out.loss.detach()) > float(clean.detach())
    torch.testing.assert_close(out.logits, model(x))
    torch.testing.assert_close(clean, F.cross_entropy(model(x), y), rtol=1e-12, atol=0)


def test_madry_defaults() -> None:
    attack = PGDTrainingConfig().attack
    assert attack == PGDConfig(steps=7, step_size=0.25, random_start=True, early_stop=False)
