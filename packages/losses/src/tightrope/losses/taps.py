"""TAPS (Mao et al. 2023, "Connecting Certified and Adversarial Training"): IBP through the
feature extractor ``f_E = model[:split]``, one PGD estimator per class inside the latent box on
the classifier ``f_C = model[split:]``, and the rectified-linear gradient connector that sends
the estimators' gradients to the latent bounds. The loss is ``L_TAPS * L_IBP``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from tightrope.attacks import MultiEstimatorConfig, MultiStepDecay, multi_estimator_box_pgd
from tightrope.bounds import Box, margin_spec
from tightrope.losses.batchnorm import BatchNormPolicy, clean_pass
from tightrope.losses.core import (
    LossOutput,
    accuracy,
    check_batch,
    check_unit_interval,
    cross_entropy,
    interval_bounds,
    robust_cross_entropy,
    verified_accuracy,
)

__all__ = [
    "TAPSBounds",
    "TAPSConfig",
    "TAPSLoss",
    "gradient_connector",
    "resolve_split",
    "scale_gradient",
    "taps_bounds",
]


def _taps_estimators() -> MultiEstimatorConfig:
    # TAPS: 8 PGD steps per estimator, step decayed x0.2 after steps 5 and 7, BN in eval mode.
    return MultiEstimatorConfig(
        steps=8, schedule=MultiStepDecay(milestones=(5 / 8, 7 / 8), gamma=0.2)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class TAPSConfig:
    """Settings of :class:`TAPSLoss`.

    Attributes:
        split: layer index into the ``nn.Sequential`` model, ``0 < split <= len(model)``:
            ``f_E = model[:split]``, ``f_C = model[split:]``. ``None`` (default) splits just before
            the last ``nn.ReLU``, so the classifier holds one ReLU layer. ``split == len(model)``
            makes the loss the IBP loss.
        connector_c: ``c`` in ``[0, 1]`` of the rectified-linear gradient connector (paper: 0.5);
            0 is the binary connector, 1 the linear one (see :func:`gradient_connector`).
        taps_gradient_scale: ``w_TAPS >= 0``, the factor on the gradient of the TAPS term of
            ``L_TAPS * L_IBP`` (paper: 5, range 2-5).
        estimators: the multi-estimator PGD in the latent box (default 8 steps, eval mode).
        batchnorm: which batch normalises the bound and estimator passes.

    Plain IBP during the eps ramp-up (as the paper trains) is the trainer's choice of loss.
    """

    split: int | None = None
    connector_c: float = 0.5
    taps_gradient_scale: float = 5.0
    estimators: MultiEstimatorConfig = field(default_factory=_taps_estimators)
    batchnorm: BatchNormPolicy = BatchNormPolicy.CLEAN_BATCH

    def __post_init__(self) -> None:
        if self.split is not None and (isinstance(self.split, bool) or self.split <= 0):
            raise ValueError(f"split must be a layer index > 0 (or None), got {self.split}")
        check_unit_interval("connector_c", self.connector_c)
        if not self.taps_gradient_scale >= 0.0:
            raise ValueError(
                f"taps_gradient_scale must be >= 0, got {self.taps_gradient_scale}"
            )


def resolve_split(model: nn.Module, split: int | None) -> int:
    """The layer index of the split of ``model``: ``split`` checked, or before the last ReLU.

    Raises:
        TypeError: when ``model`` is not an ``nn.Sequential`` (TAPS splits it by layer index).
        ValueError: when ``split`` is not in ``(0, len(model)]``, or is None and the model has
            no ReLU after its first layer.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"TAPS splits the model by layer index and needs an nn.Sequential, got "
            f"{type(model).__name__}; wrap the layers in nn.Sequential"
        )
    if split is None:
        relus = [i for i, layer in enumerate(model) if isinstance(layer, nn.ReLU) and i > 0]
        if not relus:
            raise ValueError(
                "the model has no ReLU after its first layer to split before; pass "
                "TAPSConfig(split=k) with 0 < k <= len(model)"
            )
        return relus[-1]
    if not 0 < split <= len(model):
        raise ValueError(
            f"split must satisfy 0 < split <= len(model) = {len(model)}, got {split}"
        )
    return split


class _RectifiedLinearConnector(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, lower: Tensor, upper: Tensor, point: Tensor, c: float) -> Tensor:
        ctx.save_for_backward(lower, upper, point)
        ctx.c = c
        return point.clone()

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor, Tensor, None, None]:
        (grad,) = grad_outputs
        lower, upper, point = ctx.saved_tensors
        to_lower, to_upper = connector_weights(lower, upper, point, ctx.c)
        return grad * to_lower, grad * to_upper, None, None


def connector_weights(lower: Tensor, upper: Tensor, point: Tensor, c: float
                      ) -> tuple[Tensor, Tensor]:
    """``(d point / d lower, d point / d upper)`` of :func:`gradient_connector`, elementwise."""
    width = upper - lower
    flat = width <= 0
    half = torch.full_like(width, 0.5)
    if c == 0.0:
        from_lower, from_upper = point - lower, upper - point
        to_lower = (from_lower < from_upper).to(width.dtype)
        to_upper = (from_upper < from_lower).to(width.dtype)
        tie = from_lower == from_upper
        return torch.where(tie, half, to_lower), torch.where(tie, half, to_upper)
    slack = c * torch.where(flat, torch.ones_like(width), width)
    to_lower = (1 - (point - lower) / slack).clamp(0.0, 1.0)
    to_upper = (1 - (upper - point) / slack).clamp(0.0, 1.0)
    return torch.where(flat, half, to_lower), torch.where(flat, half, to_upper)


def gradient_connector(lower: Tensor, upper: Tensor, point: Tensor, c: float = 0.5) -> Tensor:
    """TAPS's rectified-linear gradient connector (Mao et al. 2023, Sec. 3.3).

    Forward: ``point`` (the PGD estimate, detached: no gradient reaches PGD or the point).
    Backward: the incoming gradient ``g_i`` of ``point_i`` goes to the bounds as
    ``d/d lower_i = g_i max(0, 1 - (point_i - lower_i) / (c (upper_i - lower_i)))`` and
    ``d/d upper_i = g_i max(0, 1 - (upper_i - point_i) / (c (upper_i - lower_i)))``.
    ``c = 1`` is the linear connector (weights sum to 1); for ``c < 0.5`` points in the middle
    of the box send nothing. Choices made here:

    * ``upper_i == lower_i``: ``0.5 g_i`` to each bound (as the published code does);
    * ``c = 0`` (binary connector): all of ``g_i`` to the nearer bound, ``0.5 g_i`` to each when
      the point is exactly in the middle. (The published code's ``c = 0`` instead sends
      ``0.5 g_i`` only to a bound the point lies on, and nothing from interior points.)
    * the weights are clamped to ``[0, 1]``, guarding points a rounding error outside the box.

    Args:
        lower, upper: latent bounds, any shape (broadcast views are fine), ``lower <= upper``.
        point: the estimator points, same shape, inside the box.
        c: in ``[0, 1]``.
    """
    check_unit_interval("c", c)
    out: Tensor = _RectifiedLinearConnector.apply(  # type: ignore[no-untyped-call]
        lower, upper, point.detach(), c
    )
    return out


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return t.clone()

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor, None]:
        return grad_outputs[0] * ctx.scale, None


def scale_gradient(t: Tensor, scale: float) -> Tensor:
    """Identity forward; the gradient flowing back through it is multiplied by ``scale``."""
    out: Tensor = _ScaleGradient.apply(t, scale)  # type: ignore[no-untyped-call]
    return out


@dataclass(frozen=True, slots=True)
class TAPSBounds:
    """Margins of one TAPS pass, ``(B, K-1)`` each, in ``margin_spec`` order.

    Attributes:
        taps: ``f_C(z_hat)`` margins of the estimators, differentiable (through the connector to
            the latent bounds, and through ``f_C``'s parameters); equal to the PGD margins.
        ibp: IBP lower bounds of the whole model (propagated through the latent box).
    """

    taps: Tensor
    ibp: Tensor


def taps_bounds(
    model: nn.Sequential,
    box: Box,
    y: Tensor,
    split: int,
    *,
    c: float = 0.5,
    estimators: MultiEstimatorConfig | None = None,
    generator: torch.Generator | None = None,
) -> TAPSBounds:
    """TAPS margin estimates and IBP margin bounds of ``model`` on ``box``.

    IBP through ``model[:split]`` gives the latent box ``[z_lo, z_hi]``;
    :func:`tightrope.attacks.multi_estimator_box_pgd` on ``model[split:]`` finds, for each class
    ``j != y``, a point ``z_hat_j`` minimising ``z_y - z_j``; the TAPS margin ``j`` is
    ``f_C(gradient_connector(z_lo, z_hi, z_hat_j, c))``. Requires ``0 < split < len(model)``.
    BatchNorm in ``f_C`` runs in the model's mode for the margins (under ``clean_pass`` with
    ``CLEAN_BATCH`` that is the clean statistics, which the estimators also use).

    Args:
        box: ``(B, *S)`` input box; ``y: (B,)`` labels.
    """
    extractor, classifier = model[:split], model[split:]
    latent = interval_bounds(extractor, box)
    found = multi_estimator_box_pgd(
        classifier, latent.lower, latent.upper, y, config=estimators, generator=generator
    )
    batch, estimators_per_sample = found.classes.shape
    num_classes = estimators_per_sample + 1
    C = margin_spec(y, num_classes, dtype=box.lower.dtype).to(box.lower.device)
    ibp_lower = interval_bounds(classifier, latent, C).lower

    def per_estimator(t: Tensor) -> Tensor:
        return t.unsqueeze(1).expand(found.points.shape)

    points = gradient_connector(
        per_estimator(latent.lower), per_estimator(latent.upper), found.points, c
    )
    logits = classifier(points.flatten(0, 1)).view(batch, estimators_per_sample, num_classes)
    own = logits.gather(2, y.view(batch, 1, 1).expand(batch, estimators_per_sample, 1))
    other = logits.gather(2, found.classes.unsqueeze(2))
    return TAPSBounds(taps=(own - other).squeeze(2), ibp=ibp_lower)


@dataclass(frozen=True, slots=True)
class TAPSLoss:
    """``L_TAPS * L_IBP`` with ``L = mean_b robust CE``, of the TAPS margins and the IBP margin
    bounds on ``[x - eps, x + eps] ∩ [0, 1]``; the gradient of ``L_TAPS`` is scaled by
    ``w_TAPS`` with an identity autograd function (:func:`scale_gradient`), as the published
    code does, so the loss value is the plain product.

    With ``split == len(model)`` the loss is exactly :class:`~tightrope.losses.IBPLoss`'s (not
    its square): the TAPS margins are then the IBP bounds. ``generator`` drives the estimators'
    random starts and is required with the default estimators. Metrics: ``taps_accuracy`` (all
    TAPS margins positive), ``ibp_verified_accuracy``, ``taps_loss``, ``robust_loss`` (IBP).
    """

    config: TAPSConfig = field(default_factory=TAPSConfig)
    generator: torch.Generator | None = None

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> LossOutput:
        check_batch(x, y, eps)
        return taps_loss(model, x, y, Box.from_linf(x, eps), self.config, self.generator)


def taps_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    box: Box,
    config: TAPSConfig,
    generator: torch.Generator | None,
) -> LossOutput:
    """:class:`TAPSLoss` on an arbitrary input ``box`` (STAPS passes SABR's small box)."""
    split = resolve_split(model, config.split)
    model = cast(nn.Sequential, model)  # resolve_split checked it
    with clean_pass(model, x, config.batchnorm) as logits:
        if split == len(model):
            C = margin_spec(y, logits.shape[1], dtype=x.dtype).to(x.device)
            ibp_lower = interval_bounds(model, box, C).lower
            taps_margins = ibp_lower
        else:
            bounds = taps_bounds(
                model, box, y, split, c=config.connector_c,
                estimators=config.estimators, generator=generator,
            )
            ibp_lower, taps_margins = bounds.ibp, bounds.taps
    ibp_term = robust_cross_entropy(ibp_lower).mean()
    taps_term = robust_cross_entropy(taps_margins).mean()
    if split == len(model):
        loss = ibp_term
    else:
        loss = scale_gradient(taps_term, config.taps_gradient_scale) * ibp_term
    metrics = {
        "robust_loss": ibp_term.detach(),
        "taps_loss": taps_term.detach(),
        "natural_loss": cross_entropy(logits, y).detach(),
        "natural_accuracy": accuracy(logits, y),
        "taps_accuracy": verified_accuracy(taps_margins),
        "ibp_verified_accuracy": verified_accuracy(ibp_lower),
    }
    return LossOutput(loss=loss, logits=logits, metrics=metrics)
