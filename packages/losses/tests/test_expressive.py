"""Expressivity (De Palma et al. 2024, Definition 1) of CC-, MTL- and Exp-IBP.

alpha = 0 gives exactly the adversarial loss, alpha = 1 exactly the IBP loss, and in between the
loss is non-decreasing in alpha and lies between the two. The attack point is the same for every
alpha because every loss gets a generator with the same seed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tightrope.attacks import FGSMConfig, fgsm, pgd
from tightrope.bounds import Box, ibp, margin_spec
from tightrope.losses import (
    CCIBPConfig,
    CCIBPLoss,
    ExpIBPConfig,
    ExpIBPLoss,
    IBPLoss,
    MTLIBPConfig,
    MTLIBPLoss,
    expressive_attack,
    expressive_pgd_attack,
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


def _recorded_inputs(model: nn.Module) -> list[torch.Tensor]:
    """Every input the model's first layer sees from now on (attack iterates, clean and
    adversarial passes; the bound passes do not call it)."""
    seen: list[torch.Tensor] = []
    model[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_default_attack_is_the_papers_random_start_fgsm(name: str) -> None:
    config = {"cc_ibp": CCIBPConfig, "mtl_ibp": MTLIBPConfig, "exp_ibp": ExpIBPConfig}[name]()
    assert config.attack == FGSMConfig(step_size=10.0, random_start=True)
    assert config.attack == expressive_attack()
    assert config.attack_eps_factor == 1.0
    model = small_mlp(3)
    x, y = batch(8, (16, 6), 4)
    seen = _recorded_inputs(model)
    BUILDERS[name](0.3, torch.Generator().manual_seed(0))(model, x, y, 0.05)
    # Random start, one step onto a vertex of the eps ball (∩ [0, 1]), clean, adversarial.
    assert len(seen) == 4
    assert torch.equal(seen[2], x)
    assert float((seen[-1] - x).abs().max()) == pytest.approx(0.05)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_pgd_and_attack_radius_options_reach_the_attack(name: str) -> None:
    # CIFAR-10 2/255 in De Palma et al.'s code: 8 PGD steps of 0.25 times the attack radius
    # in a ball of 2.1 eps; the IBP bound stays on the eps box.
    eps, factor = 0.05, 2.1
    options = {"attack": expressive_pgd_attack(), "attack_eps_factor": factor, "alpha": 0.0}
    config = {"cc_ibp": CCIBPConfig, "mtl_ibp": MTLIBPConfig, "exp_ibp": ExpIBPConfig}[name]
    loss = {"cc_ibp": CCIBPLoss, "mtl_ibp": MTLIBPLoss, "exp_ibp": ExpIBPLoss}[name]
    model = small_mlp(5)
    x, y = batch(9, (16, 6), 4)
    seen = _recorded_inputs(model)
    out = loss(config(**options), torch.Generator().manual_seed(1))(model, x, y, eps)
    # 8 steps (one forward each) and the last iterate, then the clean and adversarial passes.
    assert len(seen) == 8 + 1 + 2
    attack_iterates, x_adv = seen[:9], seen[-1]
    assert torch.equal(seen[9], x)
    distances = torch.stack([(z - x).abs().amax(dim=1) for z in attack_iterates])
    assert float(distances.max()) <= factor * eps * (1 + 1e-12)
    assert float((x_adv - x).abs().max()) > 1.5 * eps   # beyond the eps ball
    # Consecutive iterates move by at most 0.25 of the attack radius per coordinate.
    moves = torch.stack([(b - a).abs().max() for a, b in itertools.pairwise(attack_iterates)])
    assert float(moves.max()) <= 0.25 * factor * eps * (1 + 1e-12)
    assert float(moves.max()) == pytest.approx(0.25 * factor * eps)
    # The same point as the attack run directly at 2.1 eps with the same generator; at
    # alpha = 0 the loss is the adversarial cross-entropy there.
    direct = pgd(model, x, y, factor * eps, config=expressive_pgd_attack(),
                 generator=torch.Generator().manual_seed(1)).x_adv
    torch.testing.assert_close(x_adv, direct, rtol=0, atol=0)
    torch.testing.assert_close(out.metrics["adversarial_loss"],
                               F.cross_entropy(model(direct), y), rtol=1e-12, atol=0)
    ibp_lower = ibp(model, Box.from_linf(x, eps), margin_spec(y, 4, dtype=x.dtype)).lower
    torch.testing.assert_close(out.metrics["robust_loss"],
                               robust_cross_entropy(ibp_lower).mean(), rtol=1e-12, atol=0)


def test_attack_radius_factor_is_checked() -> None:
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="attack_eps_factor must be a finite number > 0"):
            MTLIBPConfig(attack_eps_factor=bad)
