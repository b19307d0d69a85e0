"""SABR (Mueller et al. 2023, "Certified Training: Small Boxes are All You Need"): the IBP loss
on a small box of radius ``lambda eps`` around a PGD point, kept inside the eps box."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import Tensor, nn

from tightrope.attacks import MultiStepDecay, PGDConfig, pgd
from tightrope.bounds import Affine, Box, graph, margin_spec, prepare, tail_bounds
from tightrope.bounds.network import Network, Relu, expect_relu
from tightrope.losses.batchnorm import BatchNormPolicy, clean_pass
from tightrope.losses.core import (
    LossOutput,
    accuracy,
    check_batch,
    cross_entropy,
    interval_bounds,
    record_pre_activations,
    robust_cross_entropy,
    verified_accuracy,
)

__all__ = ["SABRConfig", "SABRLoss", "SmallBoxRadius", "shrunk_interval_bounds", "small_box"]


def _sabr_attack() -> PGDConfig:
    # The reference's box-centring PGD (eth-sri/SABR, adv_whitebox with --adv_step_size 0.5
    # --adv_start_steps 8, CE, BatchNorm in eval mode): 8 steps from a uniform random start,
    # step 0.5 eps (the reference scales by the batch's largest clipped half-width, eps unless
    # the whole batch sits at the domain's edges), x0.1 at steps ceil(0.5 n), ceil(0.8 n) and
    # ceil(0.9 n) = 4, 7, 8: steps 0-3 move 0.5 eps, 4-6 0.05 eps, 7 0.005 eps. It stops once
    # every sample of the batch is misclassified.
    return PGDConfig(
        steps=8,
        step_size=0.5,
        schedule=MultiStepDecay(milestones=(0.5, 0.8, 0.9), gamma=0.1),
        random_start=True,
        early_stop=True,
    )


class SmallBoxRadius(Enum):
    """How :func:`small_box` sizes the box, per coordinate.

    ``EPS``: ``tau = shrink * eps``, SABR's reference (eth-sri/SABR without
    ``--dimwise_scaling``). ``HALF_WIDTH``: ``tau = shrink * (hi - lo) / 2`` with ``[lo, hi]`` the
    eps box clipped to ``[0, 1]``, the TAPS reference's small box for STAPS (eth-sri/TAPS,
    ``SmallBoxModelWrapper``): at the domain's edges the box shrinks with the clipped box.
    """

    EPS = "eps"
    HALF_WIDTH = "half_width"


@dataclass(frozen=True, slots=True, kw_only=True)
class SABRConfig:
    """Settings of :class:`SABRLoss`.

    Attributes:
        shrink: ``lambda`` in ``(0, 1]``, the small box's radius as a fraction of eps; paper:
            MNIST 0.1 -> 0.4, 0.3 -> 0.6, CIFAR-10 2/255 -> 0.1, 8/255 -> 0.7 (default),
            TinyImageNet 0.4. At 1 the loss is the IBP loss (and no attack runs).
        attack: the PGD attack that centres the box (default: the reference's 8 steps of
            ``0.5 eps``, x0.1 from step 4 and again from step 7, random start, eval mode,
            stopping once the whole batch is misclassified).
        batchnorm: which batch normalises the bound pass.
        relu_shrink: factor on the upper bound of every unstable ReLU's output in the bound
            pass (paper: 0.8 on CIFAR-10 2/255, else 1 = off, the default). A training device:
            with a factor below 1 the propagated box is no longer a sound bound, so
            ``small_box_verified_accuracy`` is then only indicative.
        radius: how the box's radius is measured (default ``SmallBoxRadius.EPS``, SABR's
            ``lambda eps``; see :class:`SmallBoxRadius`).
    """

    shrink: float = 0.7
    attack: PGDConfig = field(default_factory=_sabr_attack)
    batchnorm: BatchNormPolicy = BatchNormPolicy.CLEAN_BATCH
    relu_shrink: float = 1.0
    radius: SmallBoxRadius = SmallBoxRadius.EPS

    def __post_init__(self) -> None:
        if not 0.0 < self.shrink <= 1.0:
            raise ValueError(f"shrink (SABR's lambda) must lie in (0, 1], got {self.shrink}")
        if not 0.0 < self.relu_shrink <= 1.0:
            raise ValueError(f"relu_shrink must lie in (0, 1], got {self.relu_shrink}")


def shrunk_interval_bounds(
    model: nn.Module, box: Box, C: Tensor | None, relu_shrink: float
) -> Box:
    """IBP bounds of ``C f`` (or ``f``) on ``box`` where each unstable ReLU's output interval
    ``[0, u]`` becomes ``[0, relu_shrink u]`` (SABR's optional shrinking; not sound below 1).

    ``C: (B, K, n_out)`` gives a ``(B, K)`` box, ``C = None`` a ``(B, *S_out)`` box (TAPS's
    latent box). With ``relu_shrink = 1`` it is ``tightrope.bounds.ibp``.
    """
    problem = prepare(model, box, C)
    net = problem.net
    if not net.is_relu_chain:
        return _graph_shrunk_bounds(net, box, problem.spec, relu_shrink)
    # Without a specification every op propagates; with one, the trailing affine block folds C.
    last_relu = max(net.relu_indices, default=-1)
    tail_start = len(net.ops) if problem.spec is None else last_relu + 1
    center, radius = box.center, box.radius
    pre_activations: list[Box] = []
    for op in net.ops[:tail_start]:
        if isinstance(op, Affine):
            center, radius = op.apply(center), op.apply_abs(radius)
            continue
        expect_relu(op, "SABR's shrunk interval pass")
        lower, upper = center - radius, center + radius
        pre_activations.append(Box(lower, upper))
        center, radius = _shrunk_relu(lower, upper, relu_shrink)
    record_pre_activations(box, tuple(pre_activations))
    if problem.spec is None:
        return Box(center - radius, center + radius)
    return tail_bounds(net, problem.spec, center, radius, tail_start)


def _shrunk_relu(lower: Tensor, upper: Tensor, relu_shrink: float) -> tuple[Tensor, Tensor]:
    """The ReLU's output interval ``(centre, radius)`` with unstable upper bounds shrunk."""
    unstable = (lower < 0) & (upper > 0)
    upper = torch.where(unstable, relu_shrink * upper, upper).relu()
    lower = lower.relu()
    return (upper + lower) / 2, (upper - lower) / 2


def _graph_shrunk_bounds(net: Network, box: Box, spec: Tensor | None, relu_shrink: float) -> Box:
    """:func:`shrunk_interval_bounds` on a graph: the interval rule table with the shrunk ReLU."""

    def shrunk(net: Network, index: int, op: object, args: list[tuple[Tensor, Tensor]]
               ) -> tuple[Tensor, Tensor]:
        (center, radius), = args
        return _shrunk_relu(center - radius, center + radius, relu_shrink)

    rules = {**graph.INTERVAL_RULES, Relu: shrunk}
    found: dict[int, Box] = {}
    if spec is not None:
        bounds = graph.tail_interval_bounds(net, box, spec, found=found, rules=rules)
    else:
        output = graph.graph_interval(net, box, found=found, rules=rules)[-1]
        assert output is not None
        bounds = Box.from_center_radius(*output)
    record_pre_activations(box, tuple(found[i] for i in net.relu_indices))
    return bounds


def small_box(
    x: Tensor,
    x_adv: Tensor,
    eps: float | Tensor,
    shrink: float,
    *,
    radius: SmallBoxRadius = SmallBoxRadius.EPS,
) -> Box:
    """SABR's box: radius ``tau`` around ``x_adv`` moved into the clipped eps box.

    With ``[lo, hi] = [x - eps, x + eps] ∩ [0, 1]``, ``tau = shrink * eps`` (``EPS``) or
    ``shrink * (hi - lo) / 2`` (``HALF_WIDTH``), the centre is ``clamp(x_adv, lo + tau,
    hi - tau)`` and the box ``[centre - tau, centre + tau]``, as both references do: the box
    keeps its full width ``2 tau`` also at the domain's edges (a pixel at 0 with eps 0.3 and
    shrink 0.4 gets ``[c - 0.12, c + 0.12]`` inside ``[0, 0.3]``). Where ``2 tau`` exceeds
    ``hi - lo`` the box is ``[lo, hi]``; at ``shrink = 1`` it is exactly the clipped eps box.
    The box always lies inside ``[lo, hi]`` (rounding included).

    Args:
        x, x_adv: ``(B, *S)``, ``x`` in ``[0, 1]``; ``x_adv`` any point (it is clamped).
        eps: a float or a tensor broadcastable to ``x``.
        shrink: ``lambda`` in ``(0, 1]``.
        radius: see :class:`SmallBoxRadius`.
    """
    outer = Box.from_linf(x, eps)
    if shrink == 1.0:
        return outer
    lo, hi = outer.lower, outer.upper
    if radius is SmallBoxRadius.EPS:
        tau = shrink * torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    else:
        tau = shrink * (hi - lo) / 2
    # torch.minimum last: where lo + tau > hi - tau the centre is hi - tau and the box all of
    # [lo, hi] after the clamps below.
    centre = torch.minimum(torch.maximum(x_adv, lo + tau), hi - tau)
    return Box(torch.maximum(centre - tau, lo), torch.minimum(centre + tau, hi))


def attacked_small_box(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    shrink: float,
    attack: PGDConfig,
    radius: SmallBoxRadius,
    generator: torch.Generator | None,
) -> Box:
    """The small box of SABR and STAPS: :func:`small_box` around the point ``attack`` finds;
    at ``shrink = 1`` the clipped eps box, wherever the attack would land (no attack runs)."""
    if shrink == 1.0:
        return Box.from_linf(x, eps)
    x_adv = pgd(model, x, y, eps, config=attack, generator=generator).x_adv
    return small_box(x, x_adv, eps, shrink, radius=radius)


@dataclass(frozen=True, slots=True)
class SABRLoss:
    """``mean_b robust CE(lb)``, ``lb: (B, K-1)`` the IBP margin bounds on :func:`small_box`.

    ``generator`` drives the attack's random start and is required with the default attack.
    ``metrics["small_box_verified_accuracy"]`` is verification of the small box only.
    """

    config: SABRConfig = field(default_factory=SABRConfig)
    generator: torch.Generator | None = None

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> LossOutput:
        check_batch(x, y, eps)
        config = self.config
        box = attacked_small_box(model, x, y, eps, shrink=config.shrink, attack=config.attack,
                                 radius=config.radius, generator=self.generator)
        with clean_pass(model, x, config.batchnorm) as logits:
            C = margin_spec(y, logits.shape[1], dtype=x.dtype).to(x.device)
            if config.relu_shrink == 1.0:
                lower = interval_bounds(model, box, C).lower
            else:
                lower = shrunk_interval_bounds(model, box, C, config.relu_shrink).lower
        robust = robust_cross_entropy(lower).mean()
        metrics = {
            "robust_loss": robust.detach(),
            "natural_loss": cross_entropy(logits, y).detach(),
            "natural_accuracy": accuracy(logits, y),
            "small_box_verified_accuracy": verified_accuracy(lower),
        }
        return LossOutput(loss=robust, logits=logits, metrics=metrics)
