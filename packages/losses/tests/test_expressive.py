"""Expressivity (De Palma et al. 2024, Definition 1) of CC-, MTL- and Exp-IBP.

alpha = 0 gives exactly the adversarial loss, alpha = 1 exactly the IBP loss, and in between the
loss is non-decreasing in alpha and lies between the two. The attack point is the same for every
alpha because every loss gets a generator with the same seed.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tightrope.attacks import FGSMConfig, fgsm
from tightrope.bounds import Box, ibp, margin_spec
from tightrope.losses import (
    CCIBPConfig,
    CCIBPLoss,
    ExpIBPConfig,
    ExpIBPLoss,
    IBPLoss,
    MTLIBPConfig,
    MTLIBPLoss,
    logit_margins,
    robust_cross_entropy,
)
from tightrope.losses.core import CertifiedLoss

from .conftest import batch, small_cnn, small_mlp

Build = Callable[[float, torch.Generator], CertifiedLoss]
BUILDERS: dict[str, Build] = {
    "cc_ibp": lambda alpha, g: CCIBPLoss(CCIBPConfig(alpha=alpha), g),
    "mtl_ibp": lambda alpha, g: MTLIBPLoss(MTLIBPConfig(alpha=alpha), g),
    "exp_ibp": lambda alpha, g: ExpIBPLoss(ExpIBPConfig(alpha=alpha), g),
}
ALPHAS = [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]
CASES = [(seed, eps) for seed in range(6) for eps in (0.02, 0.1, 0.3)]


def _model(seed: int) -> nn.Module:
    # Alternate MLPs and CNNs (BatchNorm in eval mode: the attack and the bound see one model).
    return small_mlp(seed) if seed % 2 == 0 else small_cnn(seed, classes=4).eval()


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (12, 6) if seed % 2 == 0 else (12, 1, 8, 8)
    return batch(seed + 1000, shape, 4)


def _losses(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
            seed: int) -> torch.Tensor:
    values = [
        BUILDERS[name](alpha, torch.Generator().manual_seed(seed))(model, x, y, eps).loss
        for alpha in ALPHAS
    ]
    return torch.stack(values).detach()


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize(("seed", "eps"), CASES)
def test_expressivity(name: str, seed: int, eps: float) -> None:
    model = _model(seed)
    x, y = _batch(seed)
    losses = _losses(name, model, x, y, eps, seed)
    x_adv = fgsm(model, x, y, eps, config=FGSMConfig(step_size=10.0, random_start=True),
                 generator=torch.Generator().manual_seed(seed)).x_adv
    adversarial = F.cross_entropy(model(x_adv), y).detach()
    ibp_loss = IBPLoss()(model, x, y, eps).loss.detach()
    # The endpoints must differ, or the checks below are vacuous.
    assert float(ibp_loss - adversarial) > 1e-3
    torch.testing.assert_close(losses[0], adversarial, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(losses[-1], ibp_loss, rtol=1e-12, atol=1e-12)
    tolerance = 1e-12 * float(ibp_loss)
    assert bool((losses[1:] >= losses[:-1] - tolerance).all()), losses
    assert bool((losses >= adversarial - tolerance).all())
    assert bool((losses <= ibp_loss + tolerance).all())
    # Strictly between at interior alphas: the loss really interpolates.
    assert float(losses[5]) > float(adversarial)
    assert float(losses[5]) < float(ibp_loss)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_the_generator_alone_fixes_the_attack(name: str) -> None:
    model = small_mlp(0)
    x, y = batch(5, (32, 6), 4)
    first = BUILDERS[name](0.0, torch.Generator().manual_seed(3))(model, x, y, 0.2).loss
    again = BUILDERS[name](0.0, torch.Generator().manual_seed(3))(model, x, y, 0.2).loss
    other = BUILDERS[name](0.0, torch.Generator().manual_seed(4))(model, x, y, 0.2).loss
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)


def test_cc_ibp_mixes_margins_not_losses() -> None:
    # CC-IBP and MTL-IBP agree at the endpoints but not in between (robust CE is not affine).
    model = small_mlp(2)
    x, y = batch(6, (16, 6), 4)
    cc = BUILDERS["cc_ibp"](0.5, torch.Generator().manual_seed(0))(model, x, y, 0.2).loss
    mtl = BUILDERS["mtl_ibp"](0.5, torch.Generator().manual_seed(0))(model, x, y, 0.2).loss
    assert float(cc.detach()) < float(mtl.detach())


def test_interior_alpha_matches_the_formulas() -> None:
    model = small_mlp(4)
    x, y = batch(9, (16, 6), 4)
    eps, alpha = 0.15, 0.3
    x_adv = fgsm(model, x, y, eps, config=FGSMConfig(step_size=10.0, random_start=True),
                 generator=torch.Generator().manual_seed(0)).x_adv
    adversarial_logits = model(x_adv)
    ibp_lower = ibp(model, Box.from_linf(x, eps), margin_spec(y, 4, dtype=x.dtype)).lower
    l_ibp = robust_cross_entropy(ibp_lower).mean()
    l_adv = F.cross_entropy(adversarial_logits, y)
    expected = {
        "cc_ibp": robust_cross_entropy(
            alpha * ibp_lower + (1 - alpha) * logit_margins(adversarial_logits, y)
        ).mean(),
        "mtl_ibp": alpha * l_ibp + (1 - alpha) * l_adv,
        "exp_ibp": l_ibp**alpha * l_adv ** (1 - alpha),
    }
    values = {
        name: build(alpha, torch.Generator().manual_seed(0))(model, x, y, eps).loss
        for name, build in BUILDERS.items()
    }
    for name in BUILDERS:
        torch.testing.assert_close(values[name], expected[name], rtol=1e-12, atol=0)
    assert len({round(float(v.detach()), 9) for v in values.values()}) == 3
