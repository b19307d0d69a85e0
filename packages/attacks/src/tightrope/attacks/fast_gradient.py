"""FGSM: the fast gradient sign method (Goodfellow et al. 2015, "Explaining and Harnessing
Adversarial Examples"), with the optional uniform random start of Wong et al. (2020, "Fast is
better than free").

One l_inf steepest-ascent step ``x' = clip(x0 + step_size * eps * sign(grad), ball ∩ domain)``
from ``x0 = x`` or from a uniform point of the ball. With ``step_size >= 2`` the step reaches a
vertex of the ball from any start: ``FGSMConfig(step_size=10.0, random_start=True)`` is the
attack of the expressive certified-training losses (De Palma et al. 2024, CC-/MTL-/Exp-IBP).
On a model that is linear in its input, FGSM from ``x`` is the exact worst case.

Example::

    g = torch.Generator().manual_seed(0)
    result = fgsm(model, x, y, eps=8 / 255,
                  config=FGSMConfig(step_size=10.0, random_start=True), generator=g)
    x_adv = result.x_adv                      # (B, C, H, W) in the eps ball ∩ [0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tightrope.attacks._engine import evaluate, label_score
from tightrope.attacks.core import (
    AttackResult,
    ModelMode,
    Objective,
    check_domain,
    check_generator,
    frozen_model,
    prepare_inputs,
    project,
    uniform_in_box,
)

__all__ = ["FGSMConfig", "fgsm"]


@dataclass(frozen=True, slots=True, kw_only=True)
class FGSMConfig:
    """Settings of :func:`fgsm`; calling the config runs the attack (it is an ``Attack``).

    Attributes:
        step_size: the step length as a multiple of ``eps`` (> 0).
        random_start: start from a uniform point of the ball instead of ``x``.
        objective: the function the step ascends.
        model_mode: the model's mode during the attack (restored afterwards).
        domain: the input domain the point is clipped to, or ``None``.
    """

    step_size: float = 1.0
    random_start: bool = False
    objective: Objective = Objective.CE
    model_mode: ModelMode = ModelMode.EVAL
    domain: tuple[float, float] | None = (0.0, 1.0)

    def __post_init__(self) -> None:
        if not self.step_size > 0:
            raise ValueError(f"step_size must be a positive multiple of eps, got {self.step_size}")
        check_domain(self.domain)

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        eps: float | Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> AttackResult:
        return fgsm(model, x, y, eps, config=self, generator=generator)


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    config: FGSMConfig | None = None,
    generator: torch.Generator | None = None,
) -> AttackResult:
    """One signed-gradient step in the l_inf ball of radius ``eps`` around ``x``.

    Args:
        model: any module mapping ``(B, *S)`` inputs to ``(B, K)`` logits.
        x: ``(B, *S)`` clean inputs in the domain (``[0, 1]`` by default).
        y: ``(B,)`` integer labels.
        eps: radius in input units; a float, a ``(B,)`` tensor or a tensor broadcastable to x.
        config: the settings (default ``FGSMConfig()``: plain FGSM from ``x``).
        generator: the source of the random start; required when ``random_start`` is set.

    Returns:
        ``AttackResult`` with the stepped point (not the better of start and step), whether it
        breaks the sample and the objective there. Costs one forward+backward and one forward.
    """
    config = FGSMConfig() if config is None else config
    check_generator(generator, config.random_start, x)
    inputs = prepare_inputs(x, y, eps, config.domain)
    score = label_score(inputs.y, config.objective)
    with frozen_model(model, mode=config.model_mode) as model:
        start = (
            uniform_in_box(inputs.lower, inputs.upper, generator)
            if config.random_start
            else inputs.x
        )
        first = evaluate(model, score, start, gradient=True)
        assert first.gradient is not None  # internal invariant: evaluate returned a gradient
        step = config.step_size * inputs.eps * first.gradient.sign()
        x_adv = project(start + step, inputs.lower, inputs.upper)
        final = evaluate(model, score, x_adv, gradient=False)
    return AttackResult(x_adv=x_adv.detach(), success=final.success, loss=final.objective)
