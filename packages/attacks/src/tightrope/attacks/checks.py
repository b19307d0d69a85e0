"""Warnings about evaluation mistakes that make a model look more robust than it is.

After the pitfalls listed by Carlini et al. (2019, "On Evaluating Adversarial Robustness") and
the checks AutoAttack runs before an evaluation (Croce & Hein 2020): gradient attacks need
logits (a final softmax squashes gradients), a non-zero input gradient, and a deterministic
model (randomness makes one attack look stronger or weaker than it is).

Each check returns its findings as messages and also issues each one as an
``EvaluationWarning``; an empty tuple means nothing suspicious was seen. The model's modes and
``requires_grad`` flags are restored afterwards, as for the attacks.

Example::

    from tightrope.attacks.checks import check_model
    problems = check_model(model, x, y)    # () when all is well
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from tightrope.attacks._engine import evaluate, label_score
from tightrope.attacks.core import ModelMode, Objective, check_labels, frozen_model

__all__ = [
    "EvaluationWarning",
    "check_determinism",
    "check_input_gradients",
    "check_model",
    "check_outputs",
]


class EvaluationWarning(UserWarning):
    """A likely mistake in an adversarial evaluation."""


def check_outputs(
    model: nn.Module,
    x: Tensor,
    *,
    mode: ModelMode = ModelMode.EVAL,
    tolerance: float = 1e-4,
) -> tuple[str, ...]:
    """Warn when ``model(x): (B, K)`` looks like probabilities or log-probabilities.

    Probabilities: every entry in ``[0, 1]`` and every row summing to 1; log-probabilities:
    every entry ``<= 0`` and every row's ``logsumexp`` equal to 0 (both up to ``tolerance``).
    """
    with frozen_model(model, mode=mode), torch.no_grad():
        outputs = model(x.detach())
    if outputs.dim() != 2 or outputs.shape[1] < 2:
        return _warn(
            f"the model returns shape {tuple(outputs.shape)}; attacks expect logits (B, K) "
            "with K >= 2"
        )
    in_unit = bool(((outputs >= -tolerance) & (outputs <= 1 + tolerance)).all())
    if in_unit and bool(((outputs.sum(dim=1) - 1).abs() <= tolerance).all()):
        return _warn(
            "the model's outputs look like probabilities (non-negative rows summing to 1); "
            "attacks and margins expect logits: remove the final Softmax"
        )
    log_normalised = (outputs.logsumexp(dim=1).abs() <= tolerance).all()
    if bool((outputs <= tolerance).all()) and bool(log_normalised):
        return _warn(
            "the model's outputs look like log-probabilities (rows with logsumexp 0); "
            "margins are unaffected but the DLR objective and checks assume logits: remove "
            "the final LogSoftmax"
        )
    return ()


def check_input_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    mode: ModelMode = ModelMode.EVAL,
    objective: Objective = Objective.CE,
) -> tuple[str, ...]:
    """Warn when the gradient of ``objective`` with respect to the input is zero or not finite
    for some samples: gradient attacks cannot move those (gradient masking, a rounding or
    argmax layer, saturated outputs) and a gradient-free attack is needed to evaluate them."""
    y = check_labels(x, y)
    with frozen_model(model, mode=mode):
        evaluation = evaluate(model, label_score(y, objective), x.detach(), gradient=True)
    assert evaluation.gradient is not None  # internal invariant: requested above
    per_sample = evaluation.gradient.flatten(1) if x.dim() > 1 else evaluation.gradient[:, None]
    found: list[str] = []
    not_finite = int((~torch.isfinite(per_sample)).any(dim=1).sum())
    if not_finite:
        found.append(
            f"{not_finite} of {x.shape[0]} samples have a non-finite input gradient; check the "
            "model for operations such as log(0) or division by zero"
        )
    zero = int((per_sample == 0).all(dim=1).sum())
    if zero:
        found.append(
            f"{zero} of {x.shape[0]} samples have an exactly zero input gradient: gradient "
            "attacks cannot move them; look for gradient masking (argmax, rounding, saturated "
            "softmax) and evaluate them with a gradient-free attack"
        )
    return _warn(*found)


def check_determinism(
    model: nn.Module,
    x: Tensor,
    *,
    mode: ModelMode = ModelMode.EVAL,
    repeats: int = 2,
    atol: float = 1e-6,
) -> tuple[str, ...]:
    """Warn when ``repeats`` forward passes of ``x`` differ by more than ``atol`` (dropout left
    on, randomised defences); attack results on such a model are not reproducible and an
    expectation-over-transformation attack is needed."""
    if repeats < 2:
        raise ValueError(f"repeats must be >= 2 to compare outputs, got {repeats}")
    with frozen_model(model, mode=mode), torch.no_grad():
        first = model(x.detach())
        gap = max(float((model(x.detach()) - first).abs().max()) for _ in range(repeats - 1))
    if not gap <= atol:  # also catches NaN
        return _warn(
            f"the model is not deterministic: repeated forward passes differ by up to {gap:.3g}; "
            "put it in eval mode (Dropout) or attack it with expectation over transformation"
        )
    return ()


def check_model(
    model: nn.Module, x: Tensor, y: Tensor, *, mode: ModelMode = ModelMode.EVAL
) -> tuple[str, ...]:
    """Run every check of this module on ``(x, y)`` in ``mode``; returns all the findings."""
    return (
        *check_outputs(model, x, mode=mode),
        *check_input_gradients(model, x, y, mode=mode),
        *check_determinism(model, x, mode=mode),
    )


def _warn(*messages: str) -> tuple[str, ...]:
    for message in messages:
        warnings.warn(message, EvaluationWarning, stacklevel=3)
    return messages
