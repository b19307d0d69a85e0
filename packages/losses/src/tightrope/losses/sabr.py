"""SABR (Mueller et al. 2023, "Certified Training: Small Boxes are All You Need"): the IBP loss
on a small box of radius ``lambda eps`` around a PGD point, kept inside the eps box."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tightrope.attacks import PGDConfig, pgd
from tightrope.bounds import Box, margin_spec
from tightrope.bounds.interval import tail_bounds
from tightrope.bounds.network import Affine
from tightrope.bounds.problem import prepare
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

__all__ = ["SABRConfig", "SABRLoss", "shrunk_interval_bounds", "small_box"]


def _sabr_attack() -> PGDConfig:
    # SABR: 8 PGD steps from a random start, model (BatchNorm) in eval mode.
    return PGDConfig(steps=8, random_start=True, early_stop=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class SABRConfig:
    """Settings of :class:`SABRLoss`.

    Attributes:
        shrink: ``lambda`` in ``(0, 1]``, the small box's radius as a fraction of eps; paper:
            MNIST 0.1 -> 0.4, 0.3 -> 0.6, CIFAR-10 2/255 -> 0.1, 8/255 -> 0.7 (default),
            TinyImageNet 0.4. At 1 the loss is the IBP loss.
        attack: the PGD attack that centres the box (default 8 steps, model in eval mode).
        batchnorm: which batch normalises the bound pass.
        relu_shrink: factor on the upper bound of every unstable ReLU's output in the bound
            pass (paper: 0.8 on CIFAR-10 2/255, else 1 = off, the default). A training device:
            with a factor below 1 the propagated box is no longer a sound bound, so
            ``small_box_verified_accuracy`` is then only indicative.
    """

    shrink: float = 0.7
    attack: PGDConfig = field(default_factory=_sabr_attack)
    batchnorm: BatchNormPolicy = BatchNormPolicy.CLEAN_BATCH
    relu_shrink: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.shrink <= 1.0:
            raise ValueError(f"shrink (SABR's lambda) must lie in (0, 1], got {self.shrink}")
        if not 0.0 < self.relu_shrink <= 1.0:
            raise ValueError(f"relu_shrink must lie in (0, 1], got {self.relu_shrink}")


def shrunk_interval_bounds(model: nn.Module, box: Box, C: Tensor, relu_shrink: float) -> Box:
    """IBP bounds of ``C f`` on ``box`` where each unstable ReLU's output interval
    ``[0, u]`` becomes ``[0, relu_shrink u]`` (SABR's optional shrinking; not sound below 1).

    ``C: (B, K, n_out)``; returns a ``(B, K)`` box. With ``relu_shrink = 1`` it is
    ``tightrope.bounds.ibp``.
    """
    problem = prepare(model, box, C)
    net = problem.net
    if problem.spec is None:
        raise ValueError("shrunk_interval_bounds needs a specification C: (B, K, n_out)")
    tail_start = max(net.relu_indices, default=-1) + 1
    center, radius = box.center, box.radius
    pre_activations: list[Box] = []
    for op in net.ops[:tail_start]:
        if isinstance(op, Affine):
            center, radius = op.apply(center), op.apply_abs(radius)
            continue
        lower, upper = center - radius, center + radius
        pre_activations.append(Box(lower, upper))
        unstable = (lower < 0) & (upper > 0)
        upper = torch.where(unstable, relu_shrink * upper, upper).relu()
        lower = lower.relu()
        center, radius = (upper + lower) / 2, (upper - lower) / 2
    record_pre_activations(box, tuple(pre_activations))
    return tail_bounds(net, problem.spec, center, radius, tail_start)


def small_box(x: Tensor, x_adv: Tensor, eps: float | Tensor, shrink: float) -> Box:
    """SABR's box: radius ``tau = shrink * eps`` around ``x_adv`` moved into the eps box.

    The centre is ``clamp(x_adv, x - eps + tau, x + eps - tau)``, so the box (clipped to
    ``[0, 1]``) lies inside ``[x - eps, x + eps] ∩ [0, 1]``. ``x, x_adv: (B, *S)``; ``eps`` a
    float or a tensor broadcastable to ``x``.
    """
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    tau = shrink * eps_t
    centre = torch.minimum(torch.maximum(x_adv, x - eps_t + tau), x + eps_t - tau)
    return Box.from_linf(centre, tau)


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
        x_adv = pgd(model, x, y, eps, config=self.config.attack, generator=self.generator).x_adv
        box = small_box(x, x_adv, eps, self.config.shrink)
        with clean_pass(model, x, self.config.batchnorm) as logits:
            C = margin_spec(y, logits.shape[1], dtype=x.dtype).to(x.device)
            if self.config.relu_shrink == 1.0:
                lower = interval_bounds(model, box, C).lower
            else:
                lower = shrunk_interval_bounds(model, box, C, self.config.relu_shrink).lower
        robust = robust_cross_entropy(lower).mean()
        metrics = {
            "robust_loss": robust.detach(),
            "natural_loss": cross_entropy(logits, y).detach(),
            "natural_accuracy": accuracy(logits, y),
            "small_box_verified_accuracy": verified_accuracy(lower),
        }
        return LossOutput(loss=robust, logits=logits, metrics=metrics)
