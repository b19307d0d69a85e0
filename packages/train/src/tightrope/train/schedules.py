"""Per-batch schedules of certified training: the phase (natural warm-up, eps ramp, full eps),
eps itself, and the weights that follow eps (CROWN-IBP's beta and kappa, Shi et al.'s
regulariser weight), each a function of ``eps_t / eps_max`` as in the reference code.

All are pure functions of the global optimiser step, so a resumed run recomputes them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from tightrope.train.config import EpsConfig, EpsShape

__all__ = ["Phase", "Schedule", "smoothed_ramp"]


class Phase(Enum):
    """What a training step does: ``WARMUP`` natural training at eps 0, ``RAMP`` eps growing,
    ``FULL`` eps at its final value."""

    WARMUP = "warmup"
    RAMP = "ramp"
    FULL = "full"


def smoothed_ramp(progress: float, mid: float = 0.25, power: float = 4.0) -> float:
    """Shi et al. 2021's smoothed eps ramp, a fraction in ``[0, 1]`` of the way to eps_max.

    ``c t^power`` for ``t < mid``, then the tangent line at ``mid`` continued to ``(1, 1)``;
    ``c = 1 / (mid^power + power mid^(power-1) (1 - mid))`` makes value and slope continuous.

    Args:
        progress: ``t``, the fraction of the ramp done (clipped to ``[0, 1]``).
    """
    t = min(max(progress, 0.0), 1.0)
    scale = 1.0 / (mid**power + power * mid ** (power - 1) * (1.0 - mid))
    if t < mid:
        return float(scale * t**power)
    return float(scale * (mid**power + power * mid ** (power - 1) * (t - mid)))


@dataclass(frozen=True, slots=True)
class Schedule:
    """The schedules of a run with ``steps_per_epoch`` optimiser steps per epoch.

    Step ``s`` (0-based) of the ramp uses progress ``(s - warmup_steps + 1) / ramp_steps``, so the
    last ramp step reaches eps_max and the first one is already above zero.
    """

    eps: EpsConfig
    steps_per_epoch: int

    @property
    def warmup_steps(self) -> int:
        return self.eps.warmup_epochs * self.steps_per_epoch

    @property
    def ramp_steps(self) -> int:
        return self.eps.ramp_epochs * self.steps_per_epoch

    def phase(self, step: int) -> Phase:
        if step < self.warmup_steps:
            return Phase.WARMUP
        if step < self.warmup_steps + self.ramp_steps:
            return Phase.RAMP
        return Phase.FULL

    def progress(self, step: int) -> float:
        """Fraction of the ramp done at ``step``: 0 in warm-up, 1 once eps is full."""
        phase = self.phase(step)
        if phase is Phase.WARMUP:
            return 0.0
        if phase is Phase.FULL:
            return 1.0
        return (step - self.warmup_steps + 1) / self.ramp_steps

    def eps_at(self, step: int) -> float:
        """Training eps of ``step`` (0 during warm-up)."""
        phase = self.phase(step)
        if phase is Phase.WARMUP:
            return 0.0
        if phase is Phase.FULL:
            return self.eps.train
        t = self.progress(step)
        fraction = (smoothed_ramp(t, self.eps.smoothed_mid, self.eps.smoothed_power)
                    if self.eps.shape is EpsShape.SMOOTHED else t)
        return self.eps.start + (self.eps.train - self.eps.start) * fraction

    def eps_fraction(self, step: int) -> float:
        """``eps_t / eps_max`` at ``step``: 0 in warm-up, 1 once eps is full (1 when eps_max is
        0)."""
        if self.eps.train == 0.0:
            return 1.0
        return self.eps_at(step) / self.eps.train

    def interpolate(self, pair: tuple[float, float], step: int) -> float:
        """``start + (end - start) * eps_t / eps_max``: a weight that follows eps, not ramp
        progress, as CROWN-IBP's beta and kappa do in the reference code (Zhang et al. 2020:
        ``beta = 1 - (1 - final_beta) eps / max_eps``; Shi et al. 2021: ``beta = 1 - eps_t /
        eps_max``). With the smoothed ramp eps is still small early on: at a quarter of the ramp
        1 -> 0 gives about 0.92, where progress would give 0.75."""
        start, end = pair
        return start + (end - start) * self.eps_fraction(step)

    def regularizer_weight(self, shi_lambda: float, step: int) -> float:
        """Shi et al.'s ``lambda (1 - eps_t / eps_max)`` in the natural warm-up (where it is
        ``lambda``, eps being 0) and the ramp, 0 once eps is full."""
        if self.phase(step) is Phase.FULL or self.eps.train == 0.0:
            return 0.0
        return shi_lambda * (1.0 - self.eps_at(step) / self.eps.train)
