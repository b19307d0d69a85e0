"""CROWN-IBP with lower slopes picked for tightness and smoothness (Lee et al. 2021, "Towards
Better Understanding of Training Certifiably Robust Models against Adversarial Examples").

CROWN-IBP (``beta = 1``) bounds the margins with IBP intermediate bounds and one backward pass;
each unstable ReLU's lower line may have any slope in ``[0, 1]``. Lee et al. pick, per sample and
neuron, the slope 0 or 1 by one signed-gradient step on the training loss: starting from
CROWN's adaptive slopes ``a0``, ``a = clamp(a0 - sign(dL/da), 0, 1)`` — 1 where raising the slope
lowers the loss, 0 where it raises it (``a0`` kept where the gradient is 0). The loss is the
robust cross-entropy of the bound at those slopes, differentiated at fixed slopes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tightrope.bounds import Box, Intermediate, LowerSlope, margin_spec, relax
from tightrope.losses.batchnorm import BatchNormPolicy, clean_pass
from tightrope.losses.core import (
    LossOutput,
    accuracy,
    check_batch,
    check_unit_interval,
    cross_entropy,
    record_pre_activations,
    robust_cross_entropy,
    verified_accuracy,
)

__all__ = ["LeeConfig", "LeeLoss", "signed_step_slopes"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LeeConfig:
    """Settings of :class:`LeeLoss`.

    Attributes:
        kappa: weight of the natural cross-entropy, ``kappa CE + (1 - kappa) robust CE``
            (scheduled like CROWN-IBP's; default 0).
        batchnorm: which batch normalises the bound pass (see :class:`BatchNormPolicy`).
    """

    kappa: float = 0.0
    batchnorm: BatchNormPolicy = BatchNormPolicy.CLEAN_BATCH

    def __post_init__(self) -> None:
        check_unit_interval("kappa", self.kappa)


def signed_step_slopes(start: tuple[Tensor, ...], gradients: tuple[Tensor, ...]
                       ) -> tuple[Tensor, ...]:
    """``clamp(a0 - sign(g), 0, 1)`` per neuron: 0 where ``g > 0``, 1 where ``g < 0``."""
    return tuple(
        (a - torch.sign(g)).clamp(0.0, 1.0) for a, g in zip(start, gradients, strict=True)
    )


@dataclass(frozen=True, slots=True)
class LeeLoss:
    """``kappa CE(f(x), y) + (1 - kappa) mean_b robust CE(lb)``, ``lb: (B, K-1)`` the CROWN-IBP
    lower bounds of the margins with per-neuron 0/1 lower slopes from one signed-gradient step.

    ``metrics["verified_accuracy"]`` uses that bound; ``"adaptive_robust_loss"`` is the robust
    loss at CROWN's adaptive slopes, for comparison. Costs about two CROWN-IBP passes.

    Example::

        out = LeeLoss()(model, x, y, eps=8 / 255)
        out.loss.backward()
    """

    config: LeeConfig = field(default_factory=LeeConfig)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> LossOutput:
        check_batch(x, y, eps)
        box = Box.from_linf(x, eps)
        with clean_pass(model, x, self.config.batchnorm) as logits:
            C = margin_spec(y, logits.shape[1], dtype=x.dtype).to(x.device)
            relaxed = relax(model, box, C, intermediate=Intermediate.IBP,
                            lower_slope=LowerSlope.ADAPTIVE)
            record_pre_activations(box, relaxed.pre_activations)
            start = tuple(s.detach().requires_grad_(True) for s in relaxed.default_slopes)
            with torch.enable_grad():
                probe = robust_cross_entropy(relaxed.lower(start)).mean()
                gradients = torch.autograd.grad(probe, start, allow_unused=True,
                                                materialize_grads=True)
            slopes = signed_step_slopes(tuple(s.detach() for s in start), gradients)
            lower = relaxed.lower(slopes)
        robust = robust_cross_entropy(lower).mean()
        natural = cross_entropy(logits, y)
        kappa = self.config.kappa
        loss = robust if kappa == 0.0 else kappa * natural + (1.0 - kappa) * robust
        metrics = {
            "robust_loss": robust.detach(),
            "adaptive_robust_loss": probe.detach(),
            "natural_loss": natural.detach(),
            "natural_accuracy": accuracy(logits, y),
            "verified_accuracy": verified_accuracy(lower),
        }
        return LossOutput(loss=loss, logits=logits, metrics=metrics)
