"""PGD over an arbitrary axis-aligned box, with the multi-estimator variant of TAPS (Mao et al.
2023, "TAPS: Connecting Certified and Adversarial Training").

``box_pgd`` attacks any module inside a per-sample box ``[lower, upper]`` instead of an eps
ball: in TAPS the module is the classifier head ``f_C`` and the box the IBP bounds of the
latent features ``f_E(x)``. The l_inf steepest-ascent step is scaled per coordinate by the
box's half-width, so one setting fits boxes of very different sizes.

``multi_estimator_box_pgd`` runs one independent estimator per non-target class ``j``, each
maximising its own ``z_j - z_y`` in the box, all in one batch of ``B * (K - 1)`` points (no
loop over classes or samples). It returns, per class, the smallest margin ``z_y - z_j`` found
and the point reaching it: TAPS's estimate of the worst case per class, an upper bound on the
true minimum (and so on any sound lower bound of it).

Example::

    g = torch.Generator().manual_seed(0)
    found = multi_estimator_box_pgd(head, z_lower, z_upper, y, generator=g)
    found.margins      # (B, K - 1) z_y - z_j, classes j != y in increasing order
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tightrope.attacks._engine import (
    Best,
    Evaluation,
    label_score,
    run_restarts,
    signed_ascent,
    take_rows,
)
from tightrope.attacks.core import (
    AttackResult,
    ModelMode,
    Objective,
    check_generator,
    check_labels,
    check_logits,
    frozen_model,
    uniform_in_box,
)
from tightrope.attacks.projected_gradient import check_steps
from tightrope.attacks.schedules import ConstantStep, StepSchedule

__all__ = [
    "BoxPGDConfig",
    "MultiEstimatorConfig",
    "MultiEstimatorResult",
    "box_pgd",
    "multi_estimator_box_pgd",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class BoxPGDConfig:
    """Settings of :func:`box_pgd`.

    Attributes:
        steps: gradient steps per run (>= 0).
        step_size: the base step as a multiple of each coordinate's box half-width; ``None``
            means ``2.5 / steps``.
        restarts: runs in total (>= 1); later runs start at random and attack only the samples
            that are still robust.
        random_start: start the first run at a uniform point of the box instead of its centre.
        objective: the function each step ascends.
        schedule: the step-size schedule within a run.
        early_stop: end a run once every sample it attacks is broken.
        model_mode: the module's mode during the attack (restored afterwards).
    """

    steps: int = 10
    step_size: float | None = None
    restarts: int = 1
    random_start: bool = True
    objective: Objective = Objective.CE
    schedule: StepSchedule = field(default_factory=ConstantStep)
    early_stop: bool = True
    model_mode: ModelMode = ModelMode.EVAL

    def __post_init__(self) -> None:
        check_steps(self.steps, self.restarts, self.step_size)

    @property
    def base_step(self) -> float:
        return 2.5 / max(self.steps, 1) if self.step_size is None else self.step_size


@dataclass(frozen=True, slots=True, kw_only=True)
class MultiEstimatorConfig:
    """Settings of :func:`multi_estimator_box_pgd`.

    Attributes:
        steps: gradient steps per run (>= 0).
        step_size: the base step as a multiple of each coordinate's box half-width; ``None``
            means ``2.5 / steps``.
        restarts: runs in total (>= 1); every estimator runs again and keeps its best point.
        random_start: start the first run at uniform points of the box instead of its centre.
        schedule: the step-size schedule within a run.
        model_mode: the module's mode during the attack (restored afterwards). The estimators
            share one batch, so the module must treat rows independently (eval BatchNorm).
    """

    steps: int = 10
    step_size: float | None = None
    restarts: int = 1
    random_start: bool = True
    schedule: StepSchedule = field(default_factory=ConstantStep)
    model_mode: ModelMode = ModelMode.EVAL

    def __post_init__(self) -> None:
        check_steps(self.steps, self.restarts, self.step_size)

    @property
    def base_step(self) -> float:
        return 2.5 / max(self.steps, 1) if self.step_size is None else self.step_size


@dataclass(frozen=True, slots=True)
class MultiEstimatorResult:
    """The per-class worst cases found by :func:`multi_estimator_box_pgd`; all detached.

    Attributes:
        margins: ``(B, K - 1)`` the smallest ``z_y - z_j`` found for each class ``j != y``.
        points: ``(B, K - 1, *S)`` the point in the box where each margin was found.
        classes: ``(B, K - 1)`` the class ``j`` of each estimator, the classes ``!= y`` in
            increasing order (the rows of ``tightrope.bounds.margin_spec``).
    """

    margins: Tensor
    points: Tensor
    classes: Tensor


def box_pgd(
    model: nn.Module,
    lower: Tensor,
    upper: Tensor,
    y: Tensor,
    *,
    config: BoxPGDConfig | None = None,
    generator: torch.Generator | None = None,
) -> AttackResult:
    """Untargeted PGD on ``model`` inside the box ``[lower, upper]`` (one point per sample).

    Args:
        model: any module mapping ``(B, *S)`` points to ``(B, K)`` logits.
        lower: ``(B, *S)`` lower corners of the boxes.
        upper: ``(B, *S)`` upper corners, ``>= lower``.
        y: ``(B,)`` integer labels.
        config: the settings (default ``BoxPGDConfig()``).
        generator: the source of random starts; required when any run starts at random.

    Returns:
        ``AttackResult`` with the best point per sample in the box.
    """
    config = BoxPGDConfig() if config is None else config
    lower, upper, y = _check_box(lower, upper, y)
    check_generator(generator, config.random_start or config.restarts > 1, lower)
    half_width = (upper - lower) / 2

    def run(index: Tensor, random: bool) -> Best:
        low, high = take_rows(lower, index), take_rows(upper, index)
        start = uniform_in_box(low, high, generator) if random else (low + high) / 2
        return signed_ascent(
            model,
            label_score(y[index], config.objective),
            start,
            low,
            high,
            config.base_step * take_rows(half_width, index),
            steps=config.steps,
            schedule=config.schedule,
            early_stop=config.early_stop,
        )

    with frozen_model(model, mode=config.model_mode) as model:
        best = run_restarts(
            run,
            lower.shape[0],
            lower.device,
            restarts=config.restarts,
            random_first=config.random_start,
        )
    return AttackResult(x_adv=best.x, success=best.success, loss=best.objective)


def multi_estimator_box_pgd(
    model: nn.Module,
    lower: Tensor,
    upper: Tensor,
    y: Tensor,
    *,
    config: MultiEstimatorConfig | None = None,
    generator: torch.Generator | None = None,
) -> MultiEstimatorResult:
    """One PGD estimator per non-target class in the box ``[lower, upper]``, batched.

    Args:
        model: any module mapping ``(N, *S)`` points to ``(N, K)`` logits, row by row.
        lower: ``(B, *S)`` lower corners of the boxes.
        upper: ``(B, *S)`` upper corners, ``>= lower``.
        y: ``(B,)`` integer labels.
        config: the settings (default ``MultiEstimatorConfig()``).
        generator: the source of random starts; required when any run starts at random.

    Returns:
        ``MultiEstimatorResult`` with the per-class worst margins, points and classes. Costs
        ``restarts * steps`` forward+backward passes on ``B * (K - 1)`` points, one forward
        pass per run and one forward pass on the ``B`` box centres (to learn ``K``). Memory
        is a few copies of the ``(B, K - 1, *S)`` points; the box itself is not repeated.
    """
    config = MultiEstimatorConfig() if config is None else config
    lower, upper, y = _check_box(lower, upper, y)
    check_generator(generator, config.random_start or config.restarts > 1, lower)
    batch, shape = lower.shape[0], lower.shape[1:]
    with frozen_model(model, mode=config.model_mode) as model:
        with torch.no_grad():
            centre_logits = model((lower + upper) / 2)
        check_logits(centre_logits, y)
        num_classes = centre_logits.shape[1]
        estimators = num_classes - 1
        all_classes = torch.arange(num_classes, device=y.device).expand(batch, num_classes)
        classes = all_classes[all_classes != y.unsqueeze(1)].view(batch, estimators)

        # Points are (B, K - 1, *S); the box and the step are expanded views of the per-sample
        # tensors, so only the points themselves take B * (K - 1) times the memory.
        def per_estimator(t: Tensor) -> Tensor:
            return t.unsqueeze(1).expand(batch, estimators, *shape)

        box_lower, box_upper = per_estimator(lower), per_estimator(upper)
        step = per_estimator(config.base_step * (upper - lower) / 2)
        own_y, target = y.view(batch, 1, 1).expand(batch, estimators, 1), classes.unsqueeze(2)

        def forward(points: Tensor) -> Tensor:
            logits: Tensor = model(points.flatten(0, 1))
            return logits.view(batch, estimators, num_classes)

        def score(logits: Tensor) -> tuple[Tensor, Tensor]:
            # Estimators never "succeed": each keeps climbing its own class's violation.
            violation = (logits.gather(2, target) - logits.gather(2, own_y)).squeeze(2)
            return violation, torch.zeros_like(violation, dtype=torch.bool)

        best: Best | None = None
        for run in range(config.restarts):
            found = signed_ascent(
                forward,
                score,
                # Not kept in a local: the start is freed once the first step moves away.
                uniform_in_box(box_lower, box_upper, generator)
                if config.random_start or run > 0
                else per_estimator((lower + upper) / 2).clone(),
                box_lower,
                box_upper,
                step,
                steps=config.steps,
                schedule=config.schedule,
                early_stop=False,
            )
            if best is None:
                best = found
            else:
                best.update(found.x, Evaluation(found.objective, found.success, None))
    assert best is not None  # restarts >= 1, checked by the config
    return MultiEstimatorResult(margins=-best.objective, points=best.x, classes=classes)


def _check_box(lower: Tensor, upper: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if lower.shape != upper.shape:
        raise ValueError(
            f"lower and upper must have one shape, got {tuple(lower.shape)} and "
            f"{tuple(upper.shape)}"
        )
    if upper.dtype != lower.dtype or upper.device != lower.device:
        raise TypeError("lower and upper must share dtype and device")
    y = check_labels(lower, y)
    lower, upper = lower.detach(), upper.detach()
    if bool((lower > upper).any()) or not bool(torch.isfinite(upper - lower).all()):
        raise ValueError("the box must be finite with lower <= upper everywhere")
    return lower, upper, y
