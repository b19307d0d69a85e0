"""PGD adversarial training (Madry et al. 2018, "Towards Deep Learning Models Resistant to
Adversarial Attacks"): the cross-entropy at a PGD point of the l_inf ball."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tightrope.attacks import PGDConfig, pgd
from tightrope.losses.batchnorm import BatchNormPolicy, clean_pass
from tightrope.losses.core import LossOutput, accuracy, check_batch, cross_entropy

__all__ = ["PGDTrainingConfig", "PGDTrainingLoss"]


def _madry_attack() -> PGDConfig:
    # Madry et al. on CIFAR-10: 7 steps of 2/255 at eps 8/255 (0.25 eps), one random start.
    return PGDConfig(steps=7, step_size=0.25, random_start=True, early_stop=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class PGDTrainingConfig:
    """Settings of :class:`PGDTrainingLoss`.

    Attributes:
        attack: the PGD attack (default Madry et al.'s CIFAR-10 setting: 7 steps of
            ``0.25 eps``, random start, every step run, model in eval mode); MNIST in the paper
            (40 steps of 0.01 at eps 0.3, random start):
            ``PGDConfig(steps=40, step_size=1/30, early_stop=False)``, in a training config
            ``loss.options.attack: {steps: 40, step_size: 1/30}`` (the keys left out keep this
            default's values).
        batchnorm: which batch normalises the adversarial pass (see :class:`BatchNormPolicy`).
    """

    attack: PGDConfig = field(default_factory=_madry_attack)
    batchnorm: BatchNormPolicy = BatchNormPolicy.CLEAN_BATCH


@dataclass(frozen=True, slots=True)
class PGDTrainingLoss:
    """``CE(f(x_adv), y)`` with ``x_adv`` from PGD in ``[x - eps, x + eps] ∩ [0, 1]``.

    Randomness (the random start) comes only from ``generator``, required when the attack
    starts at random. ``logits`` of the output are the clean logits; shapes as in
    :class:`~tightrope.losses.CertifiedLoss`.
    """

    config: PGDTrainingConfig = field(default_factory=PGDTrainingConfig)
    generator: torch.Generator | None = None

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> LossOutput:
        check_batch(x, y, eps)
        x_adv = pgd(model, x, y, eps, config=self.config.attack, generator=self.generator).x_adv
        with clean_pass(model, x, self.config.batchnorm) as logits:
            adversarial_logits = model(x_adv)
        loss = cross_entropy(adversarial_logits, y)
        metrics = {
            "adversarial_loss": loss.detach(),
            "natural_loss": cross_entropy(logits, y).detach(),
            "natural_accuracy": accuracy(logits, y),
            "adversarial_accuracy": accuracy(adversarial_logits, y),
        }
        return LossOutput(loss=loss, logits=logits, metrics=metrics)
