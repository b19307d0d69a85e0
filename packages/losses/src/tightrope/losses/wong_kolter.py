"""Robust training with a dual-feasible bound (Wong & Kolter 2018, "Provable Defenses against
Adversarial Examples via the Convex Outer Adversarial Polytope").

The dual network of the LP relaxation, evaluated at the dual-feasible point the paper uses,
is backward linear bound propagation in which every unstable ReLU's lower line has the slope
``u / (u - l)`` of its upper line (``LowerSlope.PARALLEL``), with intermediate bounds computed
the same way layer by layer. The loss is the robust cross-entropy of those margin bounds. The
paper's random projections (a cheaper, probabilistic estimate of the bounds for large nets) are
not used: every bound here is exact for the relaxation and sound.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from tightrope.bounds import Box, Intermediate, LowerSlope, crown, margin_spec
from tightrope.losses.batchnorm import BatchNormPolicy, clean_pass
from tightrope.losses.core import (
    LossOutput,
    accuracy,
    check_batch,
    cross_entropy,
    robust_cross_entropy,
    verified_accuracy,
)

__all__ = ["WongKolterConfig", "WongKolterLoss"]


@dataclass(frozen=True, slots=True, kw_only=True)
class WongKolterConfig:
    """Settings of :class:`WongKolterLoss`.

    Attributes:
        batchnorm: which batch normalises the bound pass (see :class:`BatchNormPolicy`).
    """

    batchnorm: BatchNormPolicy = BatchNormPolicy.CLEAN_BATCH


@dataclass(frozen=True, slots=True)
class WongKolterLoss:
    """``mean_b robust CE(lb)``, ``lb: (B, K-1)`` the dual-network lower bounds of the margins
    ``z_y - z_j`` on ``[x - eps, x + eps] ∩ [0, 1]`` (parallel lower slopes on every layer).

    Its cost grows with depth and width like full CROWN (a backward pass per layer for the
    intermediate bounds): meant for the small networks of the paper, not CNN7.

    Example::

        out = WongKolterLoss()(model, x, y, eps=0.1)   # x: (B, *S) in [0, 1], y: (B,)
        out.metrics["verified_accuracy"]
    """

    config: WongKolterConfig = field(default_factory=WongKolterConfig)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> LossOutput:
        check_batch(x, y, eps)
        with clean_pass(model, x, self.config.batchnorm) as logits:
            C = margin_spec(y, logits.shape[1], dtype=x.dtype).to(x.device)
            lower = crown(model, Box.from_linf(x, eps), C, intermediate=Intermediate.CROWN,
                          lower_slope=LowerSlope.PARALLEL, upper=False).lower
        robust = robust_cross_entropy(lower).mean()
        metrics = {
            "robust_loss": robust.detach(),
            "natural_loss": cross_entropy(logits, y).detach(),
            "natural_accuracy": accuracy(logits, y),
            "verified_accuracy": verified_accuracy(lower),
        }
        return LossOutput(loss=robust, logits=logits, metrics=metrics)
