"""STAPS (Mao et al. 2023, "Connecting Certified and Adversarial Training"): TAPS on SABR's small
box (Mueller et al. 2023) around a PGD point instead of the whole eps box."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tightrope.attacks import PGDConfig, pgd
from tightrope.losses.core import LossOutput, check_batch
from tightrope.losses.sabr import small_box
from tightrope.losses.taps import TAPSConfig, taps_loss

__all__ = ["STAPSConfig", "STAPSLoss"]


def _sabr_attack() -> PGDConfig:
    # As SABR: 8 PGD steps from a random start, model (BatchNorm) in eval mode.
    return PGDConfig(steps=8, random_start=True, early_stop=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class STAPSConfig:
    """Settings of :class:`STAPSLoss`.

    Attributes:
        shrink: SABR's ``lambda`` in ``(0, 1]``, the small box's radius as a fraction of eps
            (default 0.7, SABR's CIFAR-10 8/255 value; STAPS tunes it per setting). At 1 the
            loss is the TAPS loss.
        attack: the input-space PGD attack that centres the box (default 8 steps, eval mode).
        taps: the TAPS settings applied on the small box.
    """

    shrink: float = 0.7
    attack: PGDConfig = field(default_factory=_sabr_attack)
    taps: TAPSConfig = field(default_factory=TAPSConfig)

    def __post_init__(self) -> None:
        if not 0.0 < self.shrink <= 1.0:
            raise ValueError(f"shrink (SABR's lambda) must lie in (0, 1], got {self.shrink}")


@dataclass(frozen=True, slots=True)
class STAPSLoss:
    """:class:`~tightrope.losses.TAPSLoss` on :func:`~tightrope.losses.small_box`.

    ``generator`` drives both the input attack's and the latent estimators' random starts.
    The verification metrics refer to the small box only.
    """

    config: STAPSConfig = field(default_factory=STAPSConfig)
    generator: torch.Generator | None = None

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> LossOutput:
        check_batch(x, y, eps)
        x_adv = pgd(model, x, y, eps, config=self.config.attack, generator=self.generator).x_adv
        box = small_box(x, x_adv, eps, self.config.shrink)
        return taps_loss(model, x, y, box, self.config.taps, self.generator)
