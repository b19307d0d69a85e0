"""Step-size schedules for the fixed-budget signed-gradient attacks (``pgd``, ``box_pgd``).

A schedule maps the step index ``k`` in ``[0, steps)`` to a factor on the base step size. Each
is a frozen value; the union ``StepSchedule`` is the type a config field takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ConstantStep", "CosineStep", "MultiStepDecay", "StepSchedule"]


@dataclass(frozen=True, slots=True)
class ConstantStep:
    """The same step at every iteration (Madry et al. 2018)."""

    def factor(self, step: int, steps: int) -> float:
        return 1.0


@dataclass(frozen=True, slots=True)
class CosineStep:
    """Cosine annealing from the base step towards zero: ``(1 + cos(pi k / steps)) / 2``."""

    def factor(self, step: int, steps: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))


@dataclass(frozen=True, slots=True, kw_only=True)
class MultiStepDecay:
    """Multiply the step by ``gamma`` each time ``k / steps`` passes one of ``milestones``.

    Step ``k`` (0-based) is decayed once per milestone ``m`` with ``k >= m * steps``, i.e. from
    step ``ceil(m * steps)`` on. SABR's reference PGD is ``MultiStepDecay(milestones=(0.5, 0.8,
    0.9), gamma=0.1)`` (decays at steps 4, 7 and 8 of 8); TAPS's latent estimators use
    ``MultiStepDecay(milestones=(0.7,), gamma=0.1)`` with 20 steps (decay from step 14).

    Args:
        milestones: increasing fractions of the step budget in ``(0, 1]``.
        gamma: the decay factor in ``(0, 1]``.
    """

    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if any(not 0.0 < m <= 1.0 for m in self.milestones):
            raise ValueError(f"milestones must be fractions in (0, 1], got {self.milestones}")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing, got {self.milestones}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must lie in (0, 1], got {self.gamma}")

    def factor(self, step: int, steps: int) -> float:
        passed = sum(1 for m in self.milestones if step >= m * steps)
        return float(self.gamma**passed)


StepSchedule = ConstantStep | CosineStep | MultiStepDecay
