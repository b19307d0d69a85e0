"""IBP training (Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation for
Training Verifiably Robust Models"; Shi et al. 2021, "Fast Certified Robust Training with Short
Warmup"): robust cross-entropy of the IBP margin lower bounds."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from tightrope.losses.batchnorm import BatchNormPolicy, clean_pass
from tightrope.losses.core import (
    LossOutput,
    accuracy,
    check_batch,
    check_unit_interval,
    cross_entropy,
    ibp_margins,
    robust_cross_entropy,
    verified_accuracy,
)

__all__ = ["IBPConfig", "IBPLoss"]


@dataclass(frozen=True, slots=True, kw_only=True)
class IBPConfig:
    """Settings of :class:`IBPLoss`.

    Attributes:
        kappa: weight of the natural cross-entropy, ``kappa CE + (1 - kappa) robust CE``
            (Gowal: ramped 1 -> 0.5; Shi et al.: 0, the default). Schedule it by building a new
            config per step with ``dataclasses.replace``.
        batchnorm: which batch normalises the bound pass (see :class:`BatchNormPolicy`).
    """

    kappa: float = 0.0
    batchnorm: BatchNormPolicy = BatchNormPolicy.CLEAN_BATCH

    def __post_init__(self) -> None:
        check_unit_interval("kappa", self.kappa)


@dataclass(frozen=True, slots=True)
class IBPLoss:
    """``kappa CE(f(x), y) + (1 - kappa) mean_b ln(1 + sum_j exp(-lb_bj))``, ``lb: (B, K-1)`` the
    IBP lower bounds of ``z_y - z_j`` on ``[x - eps, x + eps] ∩ [0, 1]``.

    Example::

        out = IBPLoss()(model, x, y, eps=8 / 255)     # x: (B, C, H, W) in [0, 1], y: (B,)
        out.metrics["ibp_verified_accuracy"]
    """

    config: IBPConfig = field(default_factory=IBPConfig)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> LossOutput:
        check_batch(x, y, eps)
        with clean_pass(model, x, self.config.batchnorm) as logits:
            lower = ibp_margins(model, x, y, eps, logits.shape[1])
        robust = robust_cross_entropy(lower).mean()
        natural = cross_entropy(logits, y)
        kappa = self.config.kappa
        loss = robust if kappa == 0.0 else kappa * natural + (1.0 - kappa) * robust
        metrics = {
            "robust_loss": robust.detach(),
            "natural_loss": natural.detach(),
            "natural_accuracy": accuracy(logits, y),
            "ibp_verified_accuracy": verified_accuracy(lower),
        }
        return LossOutput(loss=loss, logits=logits, metrics=metrics)
