"""APGD: step-size-adaptive PGD with momentum (Croce & Hein 2020, "Reliable evaluation of
adversarial robustness with an ensemble of diverse parameter-free attacks"), the default
evaluation attack of Tightrope.

The step starts at ``2 * eps`` and is halved per sample at checkpoints ``w_j = ceil(p_j N)`` of
the budget ``N`` (``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03,
0.06)``) when, since the previous checkpoint, fewer than a fraction ``rho`` of the steps raised
the objective, or when the step was not halved at the previous checkpoint and the highest
objective has not grown since. A halving sends the sample back to its highest-objective point
(with that point's gradient, and momentum reset). Each step is

    z = P(x_k + eta * sign(grad))
    x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1})),   alpha = 0.75 (1 at k = 0)

with ``P`` the projection onto the ball ∩ domain. Objectives: CE or DLR (``Objective.DLR``,
shift- and scale-invariant); ``Objective.MARGIN`` also works. As in ``pgd``, every sample keeps
its best point (breaking first, then highest objective) and restarts attack only the samples
that are still robust.

Example::

    g = torch.Generator().manual_seed(0)
    result = apgd(model, x, y, eps=8 / 255,
                  config=APGDConfig(steps=100, objective=Objective.DLR), generator=g)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tightrope.attacks._engine import Best, evaluate, label_score, past, run_restarts
from tightrope.attacks.core import (
    AttackResult,
    Inputs,
    ModelMode,
    Objective,
    broadcast_rows,
    check_domain,
    check_generator,
    frozen_model,
    prepare_inputs,
    project,
    uniform_in_box,
)

__all__ = ["APGDConfig", "apgd", "apgd_checkpoints"]


@dataclass(frozen=True, slots=True, kw_only=True)
class APGDConfig:
    """Settings of :func:`apgd`; calling the config runs the attack (it is an ``Attack``).

    Attributes:
        steps: the iteration budget ``N`` per run (>= 0).
        restarts: runs in total (>= 1); later runs start at random and attack only the samples
            that are still robust.
        objective: ``Objective.CE`` or ``Objective.DLR`` (the paper's), or ``MARGIN``.
        random_start: start the first run at a uniform point of the ball instead of ``x``.
        initial_step: the first step as a multiple of ``eps`` (the paper: 2).
        momentum: ``alpha`` in ``(0, 1]`` (the paper: 0.75).
        rho: the fraction of steps in ``(0, 1]`` that must raise the objective between two
            checkpoints to keep the step size (the paper: 0.75).
        early_stop: end a run once every sample it attacks is broken.
        model_mode: the model's mode during the attack (restored afterwards).
        domain: the input domain points are clipped to, or ``None``.
    """

    steps: int = 100
    restarts: int = 1
    objective: Objective = Objective.CE
    random_start: bool = True
    initial_step: float = 2.0
    momentum: float = 0.75
    rho: float = 0.75
    early_stop: bool = True
    model_mode: ModelMode = ModelMode.EVAL
    domain: tuple[float, float] | None = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.restarts < 1:
            raise ValueError(f"restarts counts all runs and must be >= 1, got {self.restarts}")
        if not self.initial_step > 0:
            raise ValueError(f"initial_step must be positive, got {self.initial_step}")
        if not 0 < self.momentum <= 1:
            raise ValueError(f"momentum must lie in (0, 1], got {self.momentum}")
        if not 0 < self.rho <= 1:
            raise ValueError(f"rho must lie in (0, 1], got {self.rho}")
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
        return apgd(model, x, y, eps, config=self, generator=generator)


def apgd_checkpoints(steps: int) -> tuple[int, ...]:
    """The iterations ``0 < w_j < steps`` after which APGD may halve the step size."""
    fractions = [0.0, 0.22]
    while fractions[-1] < 1.0:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    # Rounding first keeps float noise (0.41 + 0.16 = 0.5700000000000001) out of the ceiling.
    points = {math.ceil(round(p * steps, 9)) for p in fractions[1:]}
    return tuple(sorted(w for w in points if 0 < w < steps))


def apgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    config: APGDConfig | None = None,
    generator: torch.Generator | None = None,
    deadline: float | None = None,
) -> AttackResult:
    """Untargeted l_inf APGD with restarts on the still-robust samples.

    Args:
        model: any module mapping ``(B, *S)`` inputs to ``(B, K)`` logits.
        x: ``(B, *S)`` clean inputs in the domain (``[0, 1]`` by default).
        y: ``(B,)`` integer labels.
        eps: radius in input units; a float, a ``(B,)`` tensor or a tensor broadcastable to x.
        config: the settings (default ``APGDConfig()``: 100 steps, one random start, CE).
        generator: the source of random starts; required when any run starts at random.
        deadline: ``time.monotonic()`` value after which no further step or restart is
            taken (the best points so far are returned).

    Returns:
        ``AttackResult``: the best point per sample, whether it breaks the sample and the
        objective there. Costs at most ``restarts * steps`` forward+backward passes plus one
        forward pass per run.
    """
    config = APGDConfig() if config is None else config
    check_generator(generator, config.random_start or config.restarts > 1, x)
    inputs = prepare_inputs(x, y, eps, config.domain)
    with frozen_model(model, mode=config.model_mode) as model:
        best = run_restarts(
            lambda index, random: _run(model, inputs.rows(index), random, config, generator,
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
    rows: Inputs,
    random: bool,
    config: APGDConfig,
    generator: torch.Generator | None,
    deadline: float | None,
) -> Best:
    score = label_score(rows.y, config.objective)
    x = uniform_in_box(rows.lower, rows.upper, generator) if random else rows.x
    current = evaluate(model, score, x, gradient=config.steps > 0)
    best = Best(x, current)
    if current.gradient is None:
        return best
    objective, gradient = current.objective, current.gradient
    # The highest-objective point so far, where a step-size halving restarts from.
    top_x, top_objective, top_gradient = x, objective, gradient
    eta = torch.full_like(objective, config.initial_step)  # per sample, a multiple of eps
    x_previous = x
    increases = torch.zeros_like(objective)
    last_checkpoint = 0
    top_at_checkpoint = top_objective
    halved_at_checkpoint = torch.ones_like(objective, dtype=torch.bool)
    checkpoints = set(apgd_checkpoints(config.steps))

    for k in range(config.steps):
        alpha = 1.0 if k == 0 else config.momentum
        step = broadcast_rows(eta, x) * rows.eps
        z = project(x + step * gradient.sign(), rows.lower, rows.upper)
        x_next = project(
            x + alpha * (z - x) + (1.0 - alpha) * (x - x_previous), rows.lower, rows.upper
        )
        last = k == config.steps - 1
        evaluation = evaluate(model, score, x_next, gradient=not last)
        best.update(x_next, evaluation)
        if last or (config.early_stop and bool(best.success.all())) or past(deadline):
            break
        assert evaluation.gradient is not None  # internal invariant: requested above
        increases = increases + (evaluation.objective > objective).to(increases.dtype)
        x_previous, x = x, x_next
        objective, gradient = evaluation.objective, evaluation.gradient
        higher = objective > top_objective
        higher_rows = broadcast_rows(higher, x)
        top_x = torch.where(higher_rows, x, top_x)
        top_objective = torch.where(higher, objective, top_objective)
        top_gradient = torch.where(higher_rows, gradient, top_gradient)

        if k + 1 in checkpoints:
            oscillating = increases < config.rho * (k + 1 - last_checkpoint)
            stalled = ~halved_at_checkpoint & (top_objective <= top_at_checkpoint)
            halve = oscillating | stalled
            halve_rows = broadcast_rows(halve, x)
            eta = torch.where(halve, eta / 2, eta)
            x = torch.where(halve_rows, top_x, x)
            x_previous = torch.where(halve_rows, top_x, x_previous)
            objective = torch.where(halve, top_objective, objective)
            gradient = torch.where(halve_rows, top_gradient, gradient)
            halved_at_checkpoint = halve
            top_at_checkpoint = top_objective
            increases = torch.zeros_like(increases)
            last_checkpoint = k + 1
    return best
