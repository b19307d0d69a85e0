"""Shared vocabulary of the losses: the result type, the loss protocol and robust cross-entropy.

Shapes: ``B`` is the batch, ``K`` the number of classes, ``*S`` one sample's input shape.
Margins are ``z_y - z_j`` for the ``K - 1`` classes ``j != y``, in the order of
``tightrope.bounds.margin_spec``; a sample is verified when every margin lower bound is positive.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tightrope.bounds import Box, ibp, ibp_trace, margin_spec

__all__ = [
    "CertifiedLoss",
    "LossOutput",
    "check_batch",
    "check_unit_interval",
    "ibp_margins",
    "interval_bounds",
    "is_recording",
    "logit_margins",
    "record_pre_activations",
    "recording_pre_activations",
    "robust_cross_entropy",
]


@dataclass(frozen=True, slots=True)
class LossOutput:
    """The result of one loss evaluation on a batch.

    Attributes:
        loss: scalar tensor to back-propagate (batch mean).
        logits: ``(B, K)`` clean logits of the step (the natural forward pass).
        metrics: detached scalar tensors worth logging, e.g. ``"robust_loss"``,
            ``"natural_accuracy"``, ``"ibp_verified_accuracy"``.
    """

    loss: Tensor
    logits: Tensor
    metrics: Mapping[str, Tensor]


class CertifiedLoss(Protocol):
    """Anything that turns a model and a labelled batch into a training objective.

    ``x: (B, *S)`` in ``[0, 1]``, ``y: (B,)`` integer labels, ``eps`` the l_inf radius in input
    units (a float, or a tensor broadcastable to ``x``).
    """

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor
    ) -> LossOutput: ...


def robust_cross_entropy(margin_lower: Tensor) -> Tensor:
    """Cross-entropy of margin lower bounds (Wong & Kolter 2018; Gowal et al. 2018).

    ``ln(1 + sum_j exp(-lb_j))`` per sample, the cross-entropy of the logit vector
    ``[0, -lb]`` with target 0, computed stably by ``logsumexp``. With ``lb`` the exact margins
    ``z_y - z_j`` it equals ``CE(z, y)``.

    Args:
        margin_lower: ``(B, K-1)`` lower bounds of the margins ``z_y - z_j``.

    Returns:
        ``(B,)`` per-sample losses (non-negative, decreasing in every margin).
    """
    if margin_lower.dim() != 2:
        raise ValueError(
            f"margin_lower must have shape (B, K-1), got {tuple(margin_lower.shape)}"
        )
    zero = margin_lower.new_zeros(margin_lower.shape[0], 1)
    return torch.logsumexp(torch.cat([zero, -margin_lower], dim=1), dim=1)


def logit_margins(logits: Tensor, y: Tensor) -> Tensor:
    """``C z`` for the margin specification: ``(B, K-1)`` margins ``z_y - z_j``, ``j != y``."""
    C = margin_spec(y, logits.shape[1], dtype=logits.dtype).to(logits.device)
    return torch.einsum("bkn,bn->bk", C, logits)


#: Where the bound passes of a loss leave their pre-activation bounds while a regulariser
#: listens (else None): ``(input box, ReLU input boxes in network order)`` per pass.
_TRACES: ContextVar[list[tuple[Box, tuple[Box, ...]]] | None] = ContextVar(
    "tightrope_losses_pre_activation_traces", default=None
)


@contextmanager
def recording_pre_activations() -> Iterator[list[tuple[Box, tuple[Box, ...]]]]:
    """Collect ``(input box, pre-activation boxes)`` of every bound pass of a loss in the block.

    Regularisers on the pre-activation bounds (Shi et al. 2021) read the bounds of the step's
    own IBP pass this way instead of propagating the box a second time.
    """
    traces: list[tuple[Box, tuple[Box, ...]]] = []
    token = _TRACES.set(traces)
    try:
        yield traces
    finally:
        _TRACES.reset(token)


def is_recording() -> bool:
    """Whether a :func:`recording_pre_activations` block is listening."""
    return _TRACES.get() is not None


def record_pre_activations(box: Box, pre_activations: tuple[Box, ...]) -> None:
    """Hand the interval pre-activation bounds of a pass over ``box`` to the listener, if any."""
    traces = _TRACES.get()
    if traces is not None:
        traces.append((box, pre_activations))


def interval_bounds(model: nn.Module, box: Box, C: Tensor | None = None) -> Box:
    """``tightrope.bounds.ibp``, recording the pre-activation intervals while
    :func:`recording_pre_activations` is active. Every IBP pass of a loss goes through here."""
    if not is_recording():
        return ibp(model, box, C)
    trace = ibp_trace(model, box, C)
    record_pre_activations(box, trace.pre_activations)
    return trace.output


def ibp_margins(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor, num_classes: int
                ) -> Tensor:
    """IBP lower bounds ``(B, K-1)`` of the margins on ``[x - eps, x + eps] ∩ [0, 1]``."""
    C = margin_spec(y, num_classes, dtype=x.dtype).to(x.device)
    return interval_bounds(model, Box.from_linf(x, eps), C).lower


def check_batch(x: Tensor, y: Tensor, eps: float | Tensor) -> None:
    """Fail early, with a message that says what to pass, on a malformed batch."""
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point batch in [0, 1], got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, *S), got {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"y must have shape (B,) = ({x.shape[0]},), got {tuple(y.shape)}"
        )
    if y.is_floating_point() or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class labels, got {y.dtype}")
    eps_t = torch.as_tensor(eps)
    if not bool(torch.isfinite(eps_t).all()) or bool((eps_t < 0).any()):
        raise ValueError(f"eps must be finite and non-negative, got {eps}")


def check_unit_interval(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``0 <= value <= 1`` (mixing weights such as alpha, beta)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Detached fraction of samples whose top logit is the label."""
    return (logits.argmax(dim=1) == y).to(logits.dtype).mean().detach()


def verified_accuracy(margin_lower: Tensor) -> Tensor:
    """Detached fraction of samples whose margin lower bounds are all positive."""
    return (margin_lower > 0).all(dim=1).to(margin_lower.dtype).mean().detach()


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Batch-mean cross-entropy."""
    return F.cross_entropy(logits, y)
