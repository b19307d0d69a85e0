"""Standard (natural) training: the cross-entropy of the clean logits."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from tightrope.losses.core import LossOutput, accuracy, check_batch, cross_entropy

__all__ = ["StandardConfig", "StandardLoss"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StandardConfig:
    """Settings of :class:`StandardLoss` (none yet; kept for a uniform registry)."""


@dataclass(frozen=True, slots=True)
class StandardLoss:
    """``CE(f(x), y)``; ``eps`` is accepted for the common interface and ignored.

    Example::

        out = StandardLoss()(model, x, y, eps=0.0)   # x: (B, *S) in [0, 1], y: (B,)
        out.loss.backward()
    """

    config: StandardConfig = field(default_factory=StandardConfig)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> LossOutput:
        check_batch(x, y, eps)
        logits = model(x)
        loss = cross_entropy(logits, y)
        metrics = {"natural_loss": loss.detach(), "natural_accuracy": accuracy(logits, y)}
        return LossOutput(loss=loss, logits=logits, metrics=metrics)
