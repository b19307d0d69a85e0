"""CC-IBP (De Palma et al. 2024, "Expressive Losses for Verified Robustness via Convex
Combinations"): robust cross-entropy of the convex combination, taken on the margins, of the IBP
lower bounds and the adversarial margins."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tightrope.losses.batchnorm import BatchNormPolicy
from tightrope.losses.core import (
    LossOutput,
    check_unit_interval,
    logit_margins,
    robust_cross_entropy,
)
from tightrope.losses.expressive import (
    ExpressiveAttack,
    check_attack_eps_factor,
    expressive_attack,
    expressive_step,
)

__all__ = ["CCIBPConfig", "CCIBPLoss"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CCIBPConfig:
    """Settings of :class:`CCIBPLoss`.

    Attributes:
        alpha: weight of the IBP bound in ``[0, 1]``; paper values: MNIST 0.1 -> 0.1,
            MNIST 0.3 -> 0.3, CIFAR-10 2/255 -> 0.01, 8/255 -> 0.5 (default), TinyImageNet 0.01.
        attack: the attack, an ``FGSMConfig`` or a ``PGDConfig`` (default random-start FGSM
            of ``10 eps``, model in eval mode; CIFAR-10 2/255 in the paper's code:
            ``expressive_pgd_attack()``, 8 steps of 0.25 times the attack radius).
        attack_eps_factor: the attack's radius in units of eps (default 1; CIFAR-10 2/255 in
            the paper's code: 2.1). The IBP bound stays on the eps box.
        batchnorm: which batch normalises the adversarial and IBP passes.
    """

    alpha: float = 0.5
    attack: ExpressiveAttack = field(default_factory=expressive_attack)
    attack_eps_factor: float = 1.0
    batchnorm: BatchNormPolicy = BatchNormPolicy.CLEAN_BATCH

    def __post_init__(self) -> None:
        check_unit_interval("alpha", self.alpha)
        check_attack_eps_factor(self.attack_eps_factor)


@dataclass(frozen=True, slots=True)
class CCIBPLoss:
    """``mean_b robust CE(alpha lb_IBP + (1 - alpha) C f(x_adv))``, all ``(B, K-1)`` margins.

    At ``alpha = 0`` it is ``CE(f(x_adv), y)``, at ``alpha = 1`` the IBP loss, and it is
    non-decreasing in ``alpha`` (for a sound bound, ``lb_IBP <= C f(x_adv)``). ``generator``
    drives the attack's random start and is required with the default attack.
    """

    config: CCIBPConfig = field(default_factory=CCIBPConfig)
    generator: torch.Generator | None = None

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> LossOutput:
        alpha = self.config.alpha
        step = expressive_step(
            model, x, y, eps, alpha=alpha, attack=self.config.attack,
            batchnorm=self.config.batchnorm, generator=self.generator,
            attack_eps_factor=self.config.attack_eps_factor,
        )
        adversarial = logit_margins(step.adversarial_logits, y)
        combined = alpha * step.ibp_lower + (1.0 - alpha) * adversarial
        loss = robust_cross_entropy(combined).mean()
        return step.output(loss, y)
