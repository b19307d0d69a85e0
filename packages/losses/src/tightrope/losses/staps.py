"""STAPS (Mao et al. 2023, "Connecting Certified and Adversarial Training"): TAPS on SABR's small
box (Mueller et al. 2023) around a PGD point instead of the whole eps box."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tightrope.attacks import PGDConfig
from tightrope.losses.core import LossOutput, check_batch
from tightrope.losses.sabr import SABRConfig, SmallBoxRadius, attacked_small_box
from tightrope.losses.taps import TAPSConfig, taps_loss

__all__ = ["STAPSConfig", "STAPSLoss"]


def _staps_attack() -> PGDConfig:
    # The TAPS reference's box-centring PGD for STAPS (eth-sri/TAPS, SmallBoxModelWrapper:
    # adv_whitebox with num_steps=10 and its default step_size=0.2, CE, BN in eval mode):
    # 10 steps of 0.2 eps from a uniform random start; its schedule (x0.2 every 10 steps) never
    # decays within 10 steps. It stops once every sample of the batch is misclassified.
    return PGDConfig(steps=10, step_size=0.2, random_start=True, early_stop=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class STAPSConfig:
    """Settings of :class:`STAPSLoss`.

    Attributes:
        shrink: SABR's ``lambda`` in ``(0, 1]``, the small box's size as a fraction of the eps
            box (default 0.7, the CIFAR-10 8/255 value; the reference uses MNIST 0.1 -> 0.4,
            0.3 -> 0.6, CIFAR-10 2/255 -> 0.1, TinyImageNet 0.6). At 1 the loss is the TAPS
            loss.
        attack: the input-space PGD attack that centres the box (default the TAPS reference's:
            10 steps of ``0.2 eps``, constant, random start, eval mode, stopping once the whole
            batch is misclassified).
        taps: the TAPS settings applied on the small box; ``taps.relu_shrink`` is SABR's
            unstable-ReLU shrink (reference: 0.8 on CIFAR-10 2/255), used in every IBP pass of
            STAPS and of its ramp loss.
        radius: how the small box's radius is measured (default ``SmallBoxRadius.HALF_WIDTH``,
            the TAPS reference's ``lambda`` times the per-coordinate half-width of the eps box
            clipped to ``[0, 1]``; ``SmallBoxRadius.EPS`` is SABR's ``lambda eps``).

    During the eps ramp the reference trains IBP on the small box, i.e. SABR with these
    settings (:meth:`ramp_config`, built by ``tightrope.losses.METHODS["staps"].build_ramp``),
    not IBP on the whole eps box.
    """

    shrink: float = 0.7
    attack: PGDConfig = field(default_factory=_staps_attack)
    taps: TAPSConfig = field(default_factory=TAPSConfig)
    radius: SmallBoxRadius = SmallBoxRadius.HALF_WIDTH

    def __post_init__(self) -> None:
        if not 0.0 < self.shrink <= 1.0:
            raise ValueError(f"shrink (SABR's lambda) must lie in (0, 1], got {self.shrink}")

    def ramp_config(self) -> SABRConfig:
        """The SABR settings of STAPS's ramp phase: IBP on this config's small box (same
        ``shrink``, ``radius``, ``attack``, and ``taps.batchnorm`` and ``taps.relu_shrink``)."""
        return SABRConfig(
            shrink=self.shrink,
            attack=self.attack,
            batchnorm=self.taps.batchnorm,
            relu_shrink=self.taps.relu_shrink,
            radius=self.radius,
        )


@dataclass(frozen=True, slots=True)
class STAPSLoss:
    """:class:`~tightrope.losses.TAPSLoss` on :func:`~tightrope.losses.small_box`.

    ``generator`` drives both the input attack's and the latent estimators' random starts.
    The verification metrics refer to the small box only. During the eps ramp use
    ``SABRLoss(config.ramp_config(), generator)`` (the reference's ramp), not this loss.
    """

    config: STAPSConfig = field(default_factory=STAPSConfig)
    generator: torch.Generator | None = None

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> LossOutput:
        check_batch(x, y, eps)
        config = self.config
        box = attacked_small_box(model, x, y, eps, shrink=config.shrink, attack=config.attack,
                                 radius=config.radius, generator=self.generator)
        return taps_loss(model, x, y, box, config.taps, self.generator)

