"""PGD: projected gradient descent on the negative loss in the l_inf ball (Madry et al. 2018,
"Towards Deep Learning Models Resistant to Adversarial Attacks").

Each step is ``x <- clip(x + a_k * eps * sign(grad), ball ∩ domain)`` with ``a_k`` the base step
size times a schedule factor. Every sample keeps the best point it has visited (a breaking
point first, then the highest objective); restarts from uniform random points re-attack only
the samples not yet broken, so they never lose a broken sample; with ``early_stop`` a run ends
as soon as every sample it attacks is broken.

Settings used in the papers: certification PGD with 200 steps and 5 restarts
(``PGDConfig(steps=200, restarts=5)``). SABR's box-centring PGD (the reference code's; the
default of ``tightrope.losses.SABRConfig``) is 8 steps in eval mode with a decaying step,
``PGDConfig(steps=8, step_size=0.5, schedule=MultiStepDecay(milestones=(0.5, 0.8, 0.9),
gamma=0.1))``: ``0.5 eps`` for steps 0-3, ``0.05 eps`` for 4-6, ``0.005 eps`` for step 7. The
plain ``PGDConfig()`` default has no decay (``ConstantStep``).

Example::

    g = torch.Generator().manual_seed(0)
    result = pgd(model, x, y, eps=0.1, config=PGDConfig(steps=200, restarts=5), generator=g)
    robust_accuracy = result.robust.float().mean()
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tightrope.attacks._engine import Best, label_score, run_restarts, signed_ascent
from tightrope.attacks.core import (
    AttackResult,
    Inputs,
    ModelMode,
    Objective,
    check_domain,
    check_generator,
    frozen_model,
    prepare_inputs,
    uniform_in_box,
)
from tightrope.attacks.schedules import ConstantStep, StepSchedule

__all__ = ["PGDConfig", "pgd"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PGDConfig:
    """Settings of :func:`pgd`; calling the config runs the attack (it is an ``Attack``).

    Attributes:
        steps: gradient steps per run (>= 0).
        step_size: the base step as a multiple of ``eps``; ``None`` means ``2.5 / steps``
            (Madry et al.), enough to cross the ball from any start.
        restarts: runs in total (>= 1); runs after the first start at random and attack only
            the samples that are still robust.
        random_start: start the first run at a uniform point of the ball instead of ``x``.
        objective: the function each step ascends.
        schedule: the step-size schedule within a run.
        early_stop: end a run once every sample it attacks is broken.
        model_mode: the model's mode during the attack (restored afterwards).
        domain: the input domain points are clipped to, or ``None``.
    """

    steps: int = 10
    step_size: float | None = None
    restarts: int = 1
    random_start: bool = True
    objective: Objective = Objective.CE
    schedule: StepSchedule = field(default_factory=ConstantStep)
    early_stop: bool = True
    model_mode: ModelMode = ModelMode.EVAL
    domain: tuple[float, float] | None = (0.0, 1.0)

    def __post_init__(self) -> None:
        check_steps(self.steps, self.restarts, self.step_size)
        check_domain(self.domain)

    @property
    def base_step(self) -> float:
        """The step as a multiple of ``eps`` before the schedule."""
        return 2.5 / max(self.steps, 1) if self.step_size is None else self.step_size

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        eps: float | Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> AttackResult:
        return pgd(model, x, y, eps, config=self, generator=generator)


def check_steps(steps: int, restarts: int, step_size: float | None) -> None:
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if restarts < 1:
        raise ValueError(f"restarts counts all runs and must be >= 1, got {restarts}")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size must be positive, or None for the default; got {step_size}")


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    config: PGDConfig | None = None,
    generator: torch.Generator | None = None,
    deadline: float | None = None,
) -> AttackResult:
    """Untargeted l_inf PGD with restarts on the still-robust samples.

    Args:
        model: any module mapping ``(B, *S)`` inputs to ``(B, K)`` logits.
        x: ``(B, *S)`` clean inputs in the domain (``[0, 1]`` by default).
        y: ``(B,)`` integer labels.
        eps: radius in input units; a float, a ``(B,)`` tensor or a tensor broadcastable to x.
        config: the settings (default ``PGDConfig()``: 10 steps, one random start, CE).
        generator: the source of random starts; required when any run starts at random.
        deadline: ``time.monotonic()`` value after which no further step or restart is
            taken (the best points so far are returned).

    Returns:
        ``AttackResult``: the best point per sample, whether it breaks the sample and the
        objective there. Costs at most ``restarts * steps`` forward+backward passes (fewer:
        restarts run on the robust samples only) plus one forward pass per run.
    """
    config = PGDConfig() if config is None else config
    check_generator(generator, config.random_start or config.restarts > 1, x)
    inputs = prepare_inputs(x, y, eps, config.domain)
    with frozen_model(model, mode=config.model_mode) as model:
        best = run_restarts(
            lambda index, random: _run(model, inputs, index, random, config, generator,
                                       deadline),
            inputs.x.shape[0],
            inputs.x.device,
            restarts=config.restarts,
            random_first=config.random_start,
            deadline=deadline,
        )
    return AttackResult(x_adv=best.x, success=best.success, loss=best.objective)


def _run(
    model: nn.Module,
    inputs: Inputs,
    index: Tensor,
    random: bool,
    config: PGDConfig,
    generator: torch.Generator | None,
    deadline: float | None,
) -> Best:
    rows = inputs.rows(index)
    start = uniform_in_box(rows.lower, rows.upper, generator) if random else rows.x
    return signed_ascent(
        model,
        label_score(rows.y, config.objective),
        start,
        rows.lower,
        rows.upper,
        config.base_step * rows.eps,
        steps=config.steps,
        schedule=config.schedule,
        early_stop=config.early_stop,
        deadline=deadline,
    )
