"""CROWN-IBP training (Zhang et al. 2020, "Towards Stable and Efficient Training of Verifiably
Robust Neural Networks"): robust cross-entropy of ``beta lb_CROWN-IBP + (1 - beta) lb_IBP``."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from tightrope.bounds import Box, Intermediate, LowerSlope, crown_ibp, margin_spec, relax
from tightrope.losses.batchnorm import BatchNormPolicy, clean_pass
from tightrope.losses.core import (
    LossOutput,
    accuracy,
    check_batch,
    check_unit_interval,
    cross_entropy,
    ibp_margins,
    is_recording,
    record_pre_activations,
    robust_cross_entropy,
    verified_accuracy,
)

__all__ = ["CROWNIBPConfig", "CROWNIBPLoss"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CROWNIBPConfig:
    """Settings of :class:`CROWNIBPLoss`; the paper schedules ``beta`` and ``kappa`` per step.

    Attributes:
        beta: weight of the CROWN-IBP bound in the mix with IBP (paper: 1 -> 0 over the eps
            ramp; default 1). At ``beta = 0`` no CROWN pass is run; in between, the IBP bound
            is read off the CROWN-IBP pass's own intervals (no second interval pass).
        kappa: weight of the natural cross-entropy (the CROWN-IBP code: 1 -> 0.5 on MNIST, 0 on
            CIFAR-10; tightrope-train schedules it so by default).
        lower_slope: lower slopes of unstable ReLUs in the CROWN pass (paper: adaptive).
        batchnorm: which batch normalises the bound passes (see :class:`BatchNormPolicy`).

    Schedule ``beta``/``kappa`` by building a new config per step with ``dataclasses.replace``.
    """

    beta: float = 1.0
    kappa: float = 0.0
    lower_slope: LowerSlope = LowerSlope.ADAPTIVE
    batchnorm: BatchNormPolicy = BatchNormPolicy.CLEAN_BATCH

    def __post_init__(self) -> None:
        check_unit_interval("beta", self.beta)
        check_unit_interval("kappa", self.kappa)


def crown_ibp_margins(
    model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor, num_classes: int,
    lower_slope: LowerSlope, beta: float = 1.0,
) -> Tensor:
    """``beta lb_CROWN-IBP + (1 - beta) lb_IBP``, lower bounds ``(B, K-1)`` of the margins.

    Both bounds come from one interval pass: CROWN-IBP's intermediate bounds already hold the
    last ReLU's interval, from which the IBP bound is read (``Relaxed.interval_lower``).
    """
    C = margin_spec(y, num_classes, dtype=x.dtype).to(x.device)
    box = Box.from_linf(x, eps)
    if beta == 1.0 and not is_recording():
        return crown_ibp(model, box, C, lower_slope=lower_slope, upper=False).lower
    relaxed = relax(model, box, C, intermediate=Intermediate.IBP, lower_slope=lower_slope)
    if is_recording():
        record_pre_activations(box, relaxed.pre_activations)
    if beta == 1.0:
        return relaxed.lower()
    return beta * relaxed.lower() + (1.0 - beta) * relaxed.interval_lower()


@dataclass(frozen=True, slots=True)
class CROWNIBPLoss:
    """``kappa CE(f(x), y) + (1 - kappa) robust CE(beta lb_CROWN-IBP + (1 - beta) lb_IBP)``.

    Bounds are on ``z_y - z_j`` (``(B, K-1)``) over ``[x - eps, x + eps] ∩ [0, 1]``; the mix
    of two sound lower bounds is sound. ``metrics["verified_accuracy"]`` uses the mixed bound.
    """

    config: CROWNIBPConfig = field(default_factory=CROWNIBPConfig)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> LossOutput:
        check_batch(x, y, eps)
        beta, kappa = self.config.beta, self.config.kappa
        with clean_pass(model, x, self.config.batchnorm) as logits:
            num_classes = logits.shape[1]
            if beta == 0.0:
                lower = ibp_margins(model, x, y, eps, num_classes)
            else:
                lower = crown_ibp_margins(model, x, y, eps, num_classes,
                                          self.config.lower_slope, beta)
        robust = robust_cross_entropy(lower).mean()
        natural = cross_entropy(logits, y)
        loss = robust if kappa == 0.0 else kappa * natural + (1.0 - kappa) * robust
        metrics = {
            "robust_loss": robust.detach(),
            "natural_loss": natural.detach(),
            "natural_accuracy": accuracy(logits, y),
            "verified_accuracy": verified_accuracy(lower),
        }
        return LossOutput(loss=loss, logits=logits, metrics=metrics)
