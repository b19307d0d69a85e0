"""The machinery the attacks share: scoring a batch, keeping the best point per sample,
signed-gradient ascent over a box and restarts on the still-robust samples.

Internal: the public attacks in the other modules are thin, documented wrappers around it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from tightrope.attacks.core import (
    Objective,
    broadcast_rows,
    check_logits,
    margins,
    objective_values,
    project_,
)
from tightrope.attacks.schedules import StepSchedule

# logits (*R, K) -> (objective (*R,) to maximise, differentiable; success (*R,) bool), where
# *R are the row dimensions: (n,) for one point per sample, (B, K - 1) for the TAPS estimators.
Score = Callable[[Tensor], tuple[Tensor, Tensor]]
Forward = Callable[[Tensor], Tensor]


def label_score(y: Tensor, objective: Objective) -> Score:
    """The score of an untargeted attack on labels ``y``: ``objective`` and ``margin <= 0``."""
    checked = False

    def score(logits: Tensor) -> tuple[Tensor, Tensor]:
        nonlocal checked
        if not checked:  # once per attack: the check synchronises with the device
            check_logits(logits, y)
            checked = True
        return objective_values(logits, y, objective), margins(logits, y) <= 0

    return score


@dataclass(frozen=True, slots=True)
class Evaluation:
    objective: Tensor
    success: Tensor
    gradient: Tensor | None


def evaluate(model: Forward, score: Score, x: Tensor, *, gradient: bool) -> Evaluation:
    """Score ``model(x)``; with ``gradient``, also the gradient of the summed objective in x.

    The objective is summed over the batch, so the gradient of each row is that row's own
    gradient as long as the model treats samples independently (eval-mode BatchNorm).
    """
    if not gradient:
        with torch.no_grad():
            objective, success = score(model(_model_layout(x)))
        return Evaluation(objective.detach(), success.detach(), None)
    with torch.enable_grad():
        x_var = _model_layout(x.detach()).requires_grad_(True)
        objective, success = score(model(x_var))
        grad: Tensor | None = None
        if objective.requires_grad:
            (grad,) = torch.autograd.grad(objective.sum(), x_var, allow_unused=True)
    # A model whose output ignores its input has no gradient: the attack then stands still.
    # Callers update the gradient in place, so it must own its memory (autograd may return
    # an expanded view).
    grad = torch.zeros_like(x) if grad is None else grad.contiguous()
    return Evaluation(objective.detach(), success.detach(), grad)


def _model_layout(x: Tensor) -> Tensor:
    """Images for the model in channels-last layout on CPU, where oneDNN's convolutions (and
    their backward) run about 10% faster; values are unchanged. The gradient comes back in the
    caller's layout (``evaluate`` makes it contiguous)."""
    if x.dim() != 4 or x.device.type != "cpu":
        return x
    return x.contiguous(memory_format=torch.channels_last)


def improves(
    objective: Tensor, success: Tensor, best_objective: Tensor, best_success: Tensor
) -> Tensor:
    """A new point beats the kept one if it newly breaks the sample, or ties on success and
    has a strictly higher objective (so NaN objectives never replace anything)."""
    return (success & ~best_success) | ((success == best_success) & (objective > best_objective))


class Best:
    """The best point per sample seen so far (mutable; internal to one attack call)."""

    __slots__ = ("objective", "success", "x")

    def __init__(self, x: Tensor, evaluation: Evaluation) -> None:
        self.x = x.detach().clone()
        self.objective = evaluation.objective.clone()
        self.success = evaluation.success.clone()

    def update(self, x: Tensor, evaluation: Evaluation) -> None:
        better = improves(evaluation.objective, evaluation.success, self.objective, self.success)
        # In place: no temporary copy of the points (out may alias an input elementwise).
        torch.where(broadcast_rows(better, x), x.detach(), self.x, out=self.x)
        self.objective = torch.where(better, evaluation.objective, self.objective)
        self.success = self.success | evaluation.success

    def merge(self, index: Tensor, other: Best) -> None:
        """Take ``other`` (found for the rows ``index``) where it beats what is kept."""
        better = improves(
            other.objective, other.success, self.objective[index], self.success[index]
        )
        rows = index[better]
        self.x[rows] = other.x[better]
        self.objective[rows] = other.objective[better]
        self.success[rows] = other.success[better]


def signed_ascent(
    model: Forward,
    score: Score,
    x: Tensor,
    lower: Tensor,
    upper: Tensor,
    step: Tensor,
    *,
    steps: int,
    schedule: StepSchedule,
    early_stop: bool,
    deadline: float | None = None,
) -> Best:
    """Projected signed-gradient ascent (l_inf steepest ascent) in the box ``[lower, upper]``.

    Starts at ``x`` (never modified; a caller that drops its own reference lets it be freed
    after the first step). ``step`` broadcasts against ``x`` and holds each coordinate's base
    step length. Costs ``steps`` forward+backward passes and one forward pass for the last
    iterate (fewer with ``early_stop`` once every sample is broken, or once ``time.monotonic()``
    passes ``deadline``).
    """
    best: Best | None = None
    for k in range(steps):
        evaluation = evaluate(model, score, x, gradient=True)
        if best is None:
            best = Best(x, evaluation)
        else:
            best.update(x, evaluation)
        if (early_stop and bool(best.success.all())) or past(deadline):
            return best
        assert evaluation.gradient is not None  # internal invariant, not user input
        # In place on the fresh gradient: the step costs no extra copies of the points.
        update = evaluation.gradient.sign_().mul_(step).mul_(schedule.factor(k, steps))
        x = project_(update.add_(x), lower, upper)
    last = evaluate(model, score, x, gradient=False)
    if best is None:
        return Best(x, last)
    best.update(x, last)
    return best


def past(deadline: float | None) -> bool:
    """Whether ``time.monotonic()`` is past ``deadline`` (never, for ``None``)."""
    return deadline is not None and time.monotonic() > deadline


def take_rows(t: Tensor, index: Tensor) -> Tensor:
    """``t[index]`` for sorted unique ``index``, without a copy when that is every row."""
    return t if index.numel() == t.shape[0] else t[index]


def run_restarts(
    attack_rows: Callable[[Tensor, bool], Best],
    batch: int,
    device: torch.device,
    *,
    restarts: int,
    random_first: bool,
    deadline: float | None = None,
) -> Best:
    """Run ``attack_rows(index, random_start)`` ``restarts`` times and keep the best per row.

    After the first run only the rows not yet broken are attacked again, always from a random
    start; a restart can only improve a row. No restart starts after ``deadline``.
    """
    best = attack_rows(torch.arange(batch, device=device), random_first)
    for _ in range(restarts - 1):
        index = (~best.success).nonzero().flatten()
        if index.numel() == 0 or past(deadline):
            break
        best.merge(index, attack_rows(index, True))
    return best
