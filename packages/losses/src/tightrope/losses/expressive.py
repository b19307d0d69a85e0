"""The pieces the expressive losses share (De Palma et al. 2024, "Expressive Losses for
Verified Robustness via Convex Combinations"): their attack and one step's adversarial logits
and IBP margin bounds.

The attack is FGSM from a uniform random start with a step of ``10 eps`` (it lands on a vertex
of the ball ∩ [0, 1]) run with the model in eval mode, before the clean pass. Its randomness
comes only from the ``torch.Generator`` held by the loss (required; never global seeding): a
loss built with ``torch.Generator().manual_seed(s)`` is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tightrope.attacks import FGSMConfig, fgsm
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

__all__ = ["ExpressiveStep", "expressive_attack", "expressive_step"]


def expressive_attack() -> FGSMConfig:
    """The paper's attack: random-start FGSM with a step of ``10 eps``, model in eval mode."""
    return FGSMConfig(step_size=10.0, random_start=True)


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
    attack: FGSMConfig,
    batchnorm: BatchNormPolicy,
    generator: torch.Generator | None,
) -> ExpressiveStep:
    """Attack, then the clean, adversarial and IBP passes under the BatchNorm policy."""
    check_batch(x, y, eps)
    check_unit_interval("alpha", alpha)
    if attack.random_start and generator is None:
        raise ValueError(
            "the expressive losses' attack starts at random: build the loss with "
            "generator=torch.Generator().manual_seed(...)"
        )
    x_adv = fgsm(model, x, y, eps, config=attack, generator=generator).x_adv
    with clean_pass(model, x, batchnorm) as logits:
        adversarial_logits = model(x_adv)
        ibp_lower = ibp_margins(model, x, y, eps, logits.shape[1])
    return ExpressiveStep(logits, adversarial_logits, ibp_lower)
