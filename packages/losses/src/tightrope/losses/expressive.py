"""The pieces the expressive losses share (De Palma et al. 2024, "Expressive Losses for
Verified Robustness via Convex Combinations"): their attack and one step's adversarial logits
and IBP margin bounds.

The attack runs with the model in eval mode, before the clean pass, in the ball of radius
``attack_eps_factor * eps`` (∩ [0, 1]); the IBP bound is always taken on the eps box. The
reference code (alessandrodepalma/expressive-losses, ``attack.py``/``train.py``) takes
``--train_att_n_steps`` signed steps of ``--train_att_step_size`` times the attack radius from a
uniform random start, in a ball of ``--attack_eps_factor`` times eps:

* the default, every setting but one: 1 step of 10, factor 1 — FGSM from a random start, which
  lands on a vertex of the ball (:func:`expressive_attack`, an ``FGSMConfig``);
* CIFAR-10 2/255: 8 steps of 0.25, factor 2.1 — :func:`expressive_pgd_attack` (a ``PGDConfig``
  that runs every step and keeps the best iterate, as the reference does) with
  ``attack_eps_factor=2.1``.

Two small differences from the reference's PGD remain: its step is scaled by the half-width of
the ball clipped to [0, 1] (ours by the radius: they differ only at pixels within the radius of
0 or 1), and among the iterates ours prefers a misclassified one to a higher cross-entropy.

The attack's randomness comes only from the ``torch.Generator`` held by the loss (required;
never global seeding): a loss built with ``torch.Generator().manual_seed(s)`` is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import Tensor, nn

from tightrope.attacks import FGSMConfig, PGDConfig
from tightrope.losses.batchnorm import BatchNormPolicy, clean_pass
from tightrope.losses.core import (
    LossOutput,
    accuracy,
    check_batch,
    check_unit_interval,
    cross_entropy,
    ibp_margins,
    robust_cross_entropy,
    verified_accuracy,
)

__all__ = [
    "ExpressiveAttack",
    "ExpressiveStep",
    "check_attack_eps_factor",
    "expressive_attack",
    "expressive_pgd_attack",
    "expressive_step",
]

ExpressiveAttack: TypeAlias = FGSMConfig | PGDConfig
"""The attacks an expressive loss takes (model mode, domain and objective are theirs)."""


def expressive_attack() -> FGSMConfig:
    """The paper's default attack: random-start FGSM with a step of ``10 eps``, model in eval
    mode (the reference's ``--train_att_n_steps 1 --train_att_step_size 10``)."""
    return FGSMConfig(step_size=10.0, random_start=True)


def expressive_pgd_attack(steps: int = 8, step_size: float = 0.25) -> PGDConfig:
    """The reference's multi-step attack: ``steps`` signed steps of ``step_size`` times the
    attack radius from a uniform random start, every step run (no early stop), the best iterate
    kept (highest cross-entropy, a misclassified one first), model in eval mode. CIFAR-10 2/255
    uses the defaults, 8 steps of 0.25, with ``attack_eps_factor=2.1``."""
    return PGDConfig(steps=steps, step_size=step_size, random_start=True, early_stop=False)


def check_attack_eps_factor(factor: float) -> None:
    """Raise ``ValueError`` unless the attack radius factor is finite and positive."""
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(
            f"attack_eps_factor must be a finite number > 0 (the attack's radius in units of "
            f"eps; 1 = the eps ball, 2.1 for CIFAR-10 2/255), got {factor}"
        )


@dataclass(frozen=True, slots=True)
class ExpressiveStep:
    """What an expressive loss combines, for one batch.

    Attributes:
        logits: ``(B, K)`` clean logits.
        adversarial_logits: ``(B, K)`` logits at the attack point.
        ibp_lower: ``(B, K-1)`` IBP lower bounds of the margins ``z_y - z_j`` on the eps box.
    """

    logits: Tensor
    adversarial_logits: Tensor
    ibp_lower: Tensor

    def output(self, loss: Tensor, y: Tensor) -> LossOutput:
        """``loss`` with the metrics every expressive loss logs (all detached)."""
        metrics = {
            "robust_loss": robust_cross_entropy(self.ibp_lower).mean().detach(),
            "adversarial_loss": cross_entropy(self.adversarial_logits, y).detach(),
            "natural_loss": cross_entropy(self.logits, y).detach(),
            "natural_accuracy": accuracy(self.logits, y),
            "adversarial_accuracy": accuracy(self.adversarial_logits, y),
            "ibp_verified_accuracy": verified_accuracy(self.ibp_lower),
        }
        return LossOutput(loss=loss, logits=self.logits, metrics=metrics)


def expressive_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    alpha: float,
    attack: ExpressiveAttack,
    batchnorm: BatchNormPolicy,
    generator: torch.Generator | None,
    attack_eps_factor: float = 1.0,
) -> ExpressiveStep:
    """Attack in the ball of radius ``attack_eps_factor * eps``, then the clean, adversarial
    and IBP (eps box) passes under the BatchNorm policy."""
    check_batch(x, y, eps)
    check_unit_interval("alpha", alpha)
    check_attack_eps_factor(attack_eps_factor)
    random = attack.random_start or (isinstance(attack, PGDConfig) and attack.restarts > 1)
    if random and generator is None:
        raise ValueError(
            "the expressive losses' attack starts at random: build the loss with "
            "generator=torch.Generator().manual_seed(...)"
        )
    attack_eps = eps if attack_eps_factor == 1.0 else eps * attack_eps_factor
    x_adv = attack(model, x, y, attack_eps, generator=generator).x_adv
    with clean_pass(model, x, batchnorm) as logits:
        adversarial_logits = model(x_adv)
        ibp_lower = ibp_margins(model, x, y, eps, logits.shape[1])
    return ExpressiveStep(logits, adversarial_logits, ibp_lower)
