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
from tightrope.losses.sabr import shrunk_interval_bounds

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
    # The reference's estimators (eth-sri/TAPS, BoxModelWrapper._get_pivotal_points_one_batch
    # with --train-steps 20, as all its published CNN7 runs but STAPS on TinyImageNet (10)):
    # uniform random start, steps of max(0.2, 2/n) = 0.2 of the box's width = 0.4 of its
    # half-width, x0.1 after step int(0.7 n) = 14 of 20, best point per estimator, BN in eval.
    return MultiEstimatorConfig(
        steps=20, step_size=0.4, schedule=MultiStepDecay(milestones=(0.7,), gamma=0.1)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class TAPSConfig:
    """Settings of :class:`TAPSLoss`.

    Attributes:
        split: where the classifier starts, overriding ``classifier_relus``: a layer index
            into the ``nn.Sequential`` model, ``0 < split <= len(model)`` (``f_E =
            model[:split]``, ``f_C = model[split:]``; ``len(model)`` makes the loss the IBP
            loss), or the name of a top-level layer (its key in the ``nn.Sequential``, e.g.
            ``"7"``, or ``"head"`` for a named one): ``f_C`` starts at that layer. A residual
            block is one layer, so the split always falls between blocks.
        classifier_relus: with ``split = None`` (default), the number of ReLU layers the
            classifier holds, each with the affine layer (and BatchNorm) that feeds it: the
            split goes just before the affine layer of the ``classifier_relus``-th ReLU from
            the end (see :func:`resolve_split`). Default 1: on CNN7 ``f_C`` is
            ``[Linear, BatchNorm1d, ReLU, Linear]``, the paper's split (reference block sizes
            ``17 4``); CIFAR-10 2/255 TAPS uses 5 (block sizes ``4 17``). A classifier of only
            ``[ReLU, Linear]`` is separable and monotone, so its exact worst case over a box
            equals IBP and TAPS would collapse to IBP.
        connector_c: ``c`` in ``[0, 1]`` of the rectified-linear gradient connector (paper: 0.5);
            0 is the binary connector, 1 the linear one (see :func:`gradient_connector`).
        taps_gradient_scale: ``w_TAPS >= 0``, the factor on the gradient of the TAPS term of
            ``L_TAPS * L_IBP`` (paper: 5, range 2-5).
        estimators: the multi-estimator PGD in the latent box (default the reference's: 20
            steps of 0.4 of the box's half-width, x0.1 from step 14, random start, eval mode).
        batchnorm: which batch normalises the bound and estimator passes.
        relu_shrink: factor on the upper bound of every unstable ReLU's output in the IBP passes
            (the latent box and the IBP bound), as SABR's (see :func:`shrunk_interval_bounds`);
            1 (default) is off. The TAPS reference applies it to every ReLU of the network
            (``--relu-shrinkage 0.2``, i.e. a factor of 0.8, for STAPS on CIFAR-10 2/255). Not
            sound below 1.

    Plain IBP during the eps ramp-up (as the paper trains) is the trainer's choice of loss; see
    ``tightrope.losses.METHODS["taps"].build_ramp``.
    """

    split: int | str | None = None
    classifier_relus: int = 1
    connector_c: float = 0.5
    taps_gradient_scale: float = 5.0
    estimators: MultiEstimatorConfig = field(default_factory=_taps_estimators)
    batchnorm: BatchNormPolicy = BatchNormPolicy.CLEAN_BATCH
    relu_shrink: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.split, str):
            if not self.split:
                raise ValueError("split must name a layer of the model, got an empty name")
        elif self.split is not None and (isinstance(self.split, bool) or self.split <= 0):
            raise ValueError(f"split must be a layer index > 0, a layer name or None, got "
                             f"{self.split!r}")
        if isinstance(self.classifier_relus, bool) or self.classifier_relus < 1:
            raise ValueError(f"classifier_relus must be >= 1, got {self.classifier_relus}")
        check_unit_interval("connector_c", self.connector_c)
        if not self.taps_gradient_scale >= 0.0:
            raise ValueError(
                f"taps_gradient_scale must be >= 0, got {self.taps_gradient_scale}"
            )
        if not 0.0 < self.relu_shrink <= 1.0:
            raise ValueError(f"relu_shrink must lie in (0, 1], got {self.relu_shrink}")


_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def resolve_split(model: nn.Module, split: int | str | None, classifier_relus: int = 1) -> int:
    """The layer index of the split of ``model``: ``split`` checked (a name: the index of that
    top-level layer), or the default one.

    The default leaves ``classifier_relus`` ReLU layers in the classifier, each with the affine
    layer (``Linear``/``Conv``) that feeds it, through BatchNorm layers only: on
    ``[..., Flatten, Linear, BatchNorm1d, ReLU, Linear]`` and ``classifier_relus = 1`` it is
    the index of that ``Linear``.

    Raises:
        TypeError: when ``model`` is not an ``nn.Sequential`` (TAPS splits it by layer index).
        ValueError: when ``split`` is not in ``(0, len(model)]``; or, with ``split = None``,
            when the model has fewer ReLUs than asked, the layer before the chosen ReLU (past
            any BatchNorm) is not affine, or the split would leave the extractor empty.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"TAPS splits the model by layer index and needs an nn.Sequential, got "
            f"{type(model).__name__}; wrap the layers in nn.Sequential"
        )
    if split is None:
        return _default_split(model, classifier_relus)
    if isinstance(split, str):
        names = [name for name, _ in model.named_children()]
        if split not in names:
            raise ValueError(f"split names no top-level layer of the model: {split!r}; its "
                             f"layers are {', '.join(names)}")
        split = names.index(split)
        if split == 0:
            raise ValueError(f"split {names[0]!r} is the model's first layer, which would leave "
                             "the feature extractor empty; name a later layer")
    if not 0 < split <= len(model):
        raise ValueError(
            f"split must satisfy 0 < split <= len(model) = {len(model)}, got {split}"
        )
    return split


def _default_split(model: nn.Sequential, classifier_relus: int) -> int:
    relus = [i for i, layer in enumerate(model) if isinstance(layer, nn.ReLU)]
    if not relus:
        raise ValueError(
            "the model has no ReLU to leave in the classifier; pass TAPSConfig(split=k) with "
            "0 < k <= len(model)"
        )
    if len(relus) < classifier_relus:
        raise ValueError(
            f"classifier_relus = {classifier_relus} but the model has {len(relus)} ReLU "
            f"layers; pass a smaller classifier_relus or TAPSConfig(split=k)"
        )
    index = relus[-classifier_relus] - 1
    while index >= 0 and isinstance(model[index], nn.modules.batchnorm._BatchNorm):
        index -= 1
    if index < 0 or not isinstance(model[index], _AFFINE):
        raise ValueError(
            f"the layer feeding ReLU {relus[-classifier_relus]} is not a Linear/Conv layer "
            f"(past BatchNorm), so the default split does not apply; pass TAPSConfig(split=k)"
        )
    if index == 0:
        raise ValueError(
            "the default split would leave the feature extractor empty (the classifier's "
            "affine layer is the model's first layer); pass TAPSConfig(split=k) with k > 0 or "
            "fewer classifier_relus"
        )
    return index


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
    relu_shrink: float = 1.0,
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
        estimators: the estimators' PGD (default ``MultiEstimatorConfig()``; TAPS's own
            setting is ``TAPSConfig().estimators``).
        relu_shrink: SABR's factor on unstable ReLUs' upper bounds in both IBP passes (1: off).
    """
    extractor, classifier = model[:split], model[split:]
    latent = _interval(extractor, box, None, relu_shrink)
    found = multi_estimator_box_pgd(
        classifier, latent.lower, latent.upper, y, config=estimators, generator=generator
    )
    batch, estimators_per_sample = found.classes.shape
    num_classes = estimators_per_sample + 1
    C = margin_spec(y, num_classes, dtype=box.lower.dtype).to(box.lower.device)
    ibp_lower = _interval(classifier, latent, C, relu_shrink).lower

    def per_estimator(t: Tensor) -> Tensor:
        return t.unsqueeze(1).expand(found.points.shape)

    points = gradient_connector(
        per_estimator(latent.lower), per_estimator(latent.upper), found.points, c
    )
    logits = classifier(points.flatten(0, 1)).view(batch, estimators_per_sample, num_classes)
    own = logits.gather(2, y.view(batch, 1, 1).expand(batch, estimators_per_sample, 1))
    other = logits.gather(2, found.classes.unsqueeze(2))
    return TAPSBounds(taps=(own - other).squeeze(2), ibp=ibp_lower)


def _interval(model: nn.Module, box: Box, C: Tensor | None, relu_shrink: float) -> Box:
    if relu_shrink == 1.0:
        return interval_bounds(model, box, C)
    return shrunk_interval_bounds(model, box, C, relu_shrink)


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
    split = resolve_split(model, config.split, config.classifier_relus)
    model = cast(nn.Sequential, model)  # resolve_split checked it
    with clean_pass(model, x, config.batchnorm) as logits:
        if split == len(model):
            C = margin_spec(y, logits.shape[1], dtype=x.dtype).to(x.device)
            ibp_lower = _interval(model, box, C, config.relu_shrink).lower
            taps_margins = ibp_lower
        else:
            bounds = taps_bounds(
                model, box, y, split, c=config.connector_c,
                estimators=config.estimators, generator=generator,
                relu_shrink=config.relu_shrink,
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
