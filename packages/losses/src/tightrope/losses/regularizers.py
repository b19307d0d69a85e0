"""The training pieces of Shi et al. 2021 ("Fast Certified Robust Training with Short Warmup")
and L1 weight regularisation, as terms composable with any loss.

* :func:`ibp_initialize` — weights ``N(0, sigma^2)`` with ``sigma = sqrt(2 pi) / fan_in`` for
  every convolution and linear layer but the last, so that IBP bounds neither explode nor
  vanish with depth at initialisation;
* :func:`tightness_penalty` — ``(1/L) sum_i ReLU(tau - delta_0 / delta_i) / tau`` with
  ``delta_i`` the mean half-width of the i-th ReLU's pre-activation bounds and ``delta_0`` that
  of the network input (after a leading ``Normalize``);
* :func:`relu_balance_penalty` — per ReLU, ``(ReLU(tau - m) + ReLU(tau - v)) / tau`` with ``m``
  and ``v`` the ratios (folded into ``(0, 1]``) of the means and of the variances of the
  pre-activation centres of surely-active against surely-dead neurons, averaged over ReLUs;
* :func:`l1_penalty` — ``sum |W|`` over convolution and linear weights;
* :class:`Regularized` — ``loss + l1 * L1 + tightness * L_tight + relu_balance * L_relu``,
  where the two Shi terms read the bounds of the wrapped loss's own IBP pass;
* :class:`WarmupLoss` — the natural cross-entropy of the warm-up, with an IBP pass on a tiny box
  (radius ``1e-6``) for the Shi terms to read.

Shi et al. weight both Shi terms by ``lambda (1 - eps_t / eps_max)`` (``lambda = 0.5``; 0.1-0.2
on TinyImageNet) from the first epoch to the end of the eps ramp-up and drop them afterwards.
In the natural warm-up epoch, where eps is 0, their code (shizhouxing/Fast-Certified-Robust-
Training, ``--min-eps-reg 1e-6``; the expressive losses' code likewise) trains on the natural
cross-entropy plus the full-weight terms read off a box of radius ``max(eps, 1e-6)``: that is
``Regularized(WarmupLoss(), ...)``. The trainer owns the schedule and passes the current weight
with ``dataclasses.replace``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tightrope.bounds import Box, Normalize
from tightrope.losses.batchnorm import BatchNormPolicy, clean_pass
from tightrope.losses.core import (
    CertifiedLoss,
    LossOutput,
    accuracy,
    check_batch,
    cross_entropy,
    ibp_margins,
    is_recording,
    recording_pre_activations,
)

__all__ = [
    "Regularized",
    "RegularizerConfig",
    "WarmupConfig",
    "WarmupLoss",
    "ibp_initialize",
    "l1_penalty",
    "relu_balance_penalty",
    "tightness_penalty",
]


def _weighted_layers(model: nn.Module) -> list[nn.Linear | nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


@torch.no_grad()
def ibp_initialize(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Shi et al. 2021's IBP initialisation, in place.

    Every ``nn.Conv2d``/``nn.Linear`` weight except that of the last such layer (in module
    order) is drawn from ``N(0, sigma^2)``, ``sigma = sqrt(2 pi) / fan_in``; biases, BatchNorm
    and the last layer keep their values. Random numbers come from ``generator`` (torch's
    default generator when None).

    Raises:
        ValueError: when the model has fewer than two such layers (nothing to initialise).
    """
    layers = _weighted_layers(model)
    if len(layers) < 2:
        raise ValueError(
            "ibp_initialize needs at least two Linear/Conv2d layers (the last keeps its "
            f"weights); the model has {len(layers)}"
        )
    for layer in layers[:-1]:
        fan_in = layer.weight[0].numel()
        layer.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in, generator=generator)


def l1_penalty(model: nn.Module) -> Tensor:
    """``sum |W|`` over the weights of every ``nn.Conv2d``/``nn.Linear`` (biases excluded)."""
    layers = _weighted_layers(model)
    if not layers:
        raise ValueError("l1_penalty found no Linear/Conv2d layer in the model")
    return torch.stack([layer.weight.abs().sum() for layer in layers]).sum()


def _input_half_width(model: nn.Module, box: Box) -> Tensor:
    """Mean half-width of the network input: after a leading ``Normalize``, as in the papers,
    whose networks see normalised inputs."""
    radius = box.radius
    first = model[0] if isinstance(model, nn.Sequential) and len(model) > 0 else None
    if isinstance(first, Normalize):
        radius = radius / first.std.abs()
    return radius.mean()


def tightness_penalty(
    input_half_width: Tensor, pre_activations: tuple[Box, ...], tau: float = 0.5
) -> Tensor:
    """``(1/L) sum_i ReLU(tau - delta_0 / delta_i) / tau`` (Shi et al. 2021, Eq. 10).

    Args:
        input_half_width: ``delta_0``, the mean half-width of the input box (scalar).
        pre_activations: the ``L`` ReLU input boxes of one IBP pass.
        tau: tolerance; the term vanishes while every layer's bounds are at most ``1/tau``
            times wider than the input's.
    """
    if not pre_activations:
        return input_half_width.new_zeros(())
    terms = [
        torch.relu(tau - input_half_width / box.radius.mean().clamp(min=1e-12)) / tau
        for box in pre_activations
    ]
    return torch.stack(terms).mean()


def relu_balance_penalty(pre_activations: tuple[Box, ...], tau: float = 0.5) -> Tensor:
    """Shi et al. 2021's ReLU-balance term: penalise layers whose surely-active and surely-dead
    neurons are unbalanced in mean or variance of their pre-activation centres.

    Per ReLU with centres ``c``: ``m = mean(c 1[l>0]) / -mean(c 1[u<0])`` and
    ``v = sum((c - mean c)^2 1[l>0]) / sum((c - mean c)^2 1[u<0])``, each folded to
    ``min(r, 1/r)``; the term is ``(ReLU(tau - m) + ReLU(tau - v)) / tau``, averaged over the
    ReLUs (a layer whose ratios are not finite, e.g. with no dead neuron, adds 0).
    """
    if not pre_activations:
        raise ValueError("relu_balance_penalty needs at least one pre-activation box")
    total = pre_activations[0].lower.new_zeros(())
    for box in pre_activations:
        center = box.center
        active = (box.lower > 0).to(center.dtype)
        dead = (box.upper < 0).to(center.dtype)
        spread = (center - center.mean()) ** 2
        mean_ratio = (center * active).mean() / -(center * dead).mean()
        var_ratio = (spread * active).sum() / (spread * dead).sum()
        mean_ratio = torch.minimum(mean_ratio, 1 / mean_ratio.clamp(min=1e-12))
        var_ratio = torch.minimum(var_ratio, 1 / var_ratio.clamp(min=1e-12))
        term = (torch.relu(tau - mean_ratio) + torch.relu(tau - var_ratio)) / tau
        if bool(torch.isfinite(term)):
            total = total + term
    return total / len(pre_activations)


@dataclass(frozen=True, slots=True, kw_only=True)
class RegularizerConfig:
    """Weights of the terms :class:`Regularized` adds (0 switches a term off).

    Attributes:
        l1: coefficient of ``sum |W|`` (the papers use 0 to 5e-5 where overfitting shows).
        tightness: weight of :func:`tightness_penalty`; Shi et al.: ``0.5 (1 - eps_t / eps_max)``
            during the ramp-up, 0 after.
        relu_balance: weight of :func:`relu_balance_penalty`; same schedule.
        tau: the tolerance of both Shi terms (0.5).
    """

    l1: float = 0.0
    tightness: float = 0.0
    relu_balance: float = 0.0
    tau: float = 0.5

    def __post_init__(self) -> None:
        for name in ("l1", "tightness", "relu_balance"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau must lie in (0, 1], got {self.tau}")


@dataclass(frozen=True, slots=True)
class Regularized:
    """``loss(model, x, y, eps) + l1 L1 + tightness L_tight + relu_balance L_relu``.

    The Shi terms use the bounds of the wrapped loss's own IBP passes (no extra propagation):
    ``delta_0`` from the input box of its first pass and the ReLU inputs of all its passes
    (TAPS has two: to the split and after it; SABR's is its small box; CROWN-IBP's are its
    IBP intermediate bounds). A loss without a bound pass (standard, PGD) cannot take them:
    ``ValueError``.

    ``metrics`` gains ``"l1_penalty"``, ``"tightness_penalty"`` and ``"relu_balance_penalty"``
    for the active terms, and ``"regularizer"``, their weighted sum.

    Example::

        base = IBPLoss()
        loss = Regularized(base, RegularizerConfig(tightness=0.5 * (1 - eps_t / eps_max),
                                                   relu_balance=0.5 * (1 - eps_t / eps_max)))
        out = loss(model, x, y, eps_t)
    """

    loss: CertifiedLoss
    config: RegularizerConfig = field(default_factory=RegularizerConfig)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> LossOutput:
        config = self.config
        needs_bounds = config.tightness > 0 or config.relu_balance > 0
        if needs_bounds:
            with recording_pre_activations() as traces:
                out = self.loss(model, x, y, eps)
        else:
            traces, out = [], self.loss(model, x, y, eps)
        terms: dict[str, Tensor] = {}
        total = out.loss.new_zeros(())
        if config.l1 > 0:
            terms["l1_penalty"] = l1_penalty(model)
            total = total + config.l1 * terms["l1_penalty"]
        if needs_bounds:
            if not traces:
                raise ValueError(
                    f"{type(self.loss).__name__} computes no IBP bounds, which the tightness "
                    "and ReLU-balance terms read; use them with an IBP-based loss or set "
                    "their weights to 0"
                )
            pre = _all_pre_activations(traces)
            if config.tightness > 0:
                delta_0 = _input_half_width(model, traces[0][0])
                terms["tightness_penalty"] = tightness_penalty(delta_0, pre, config.tau)
                total = total + config.tightness * terms["tightness_penalty"]
            if config.relu_balance > 0:
                terms["relu_balance_penalty"] = relu_balance_penalty(pre, config.tau)
                total = total + config.relu_balance * terms["relu_balance_penalty"]
        metrics = dict(out.metrics)
        metrics.update({name: value.detach() for name, value in terms.items()})
        metrics["regularizer"] = total.detach()
        return LossOutput(loss=out.loss + total, logits=out.logits, metrics=metrics)


def _all_pre_activations(traces: list[tuple[Box, tuple[Box, ...]]]) -> tuple[Box, ...]:
    return tuple(box for _, pre in traces for box in pre)


@dataclass(frozen=True, slots=True, kw_only=True)
class WarmupConfig:
    """Settings of :class:`WarmupLoss`.

    Attributes:
        min_eps: the smallest radius of the box whose bounds the Shi terms read, in pixel units
            (> 0; Shi et al.'s ``--min-eps-reg``, 1e-6).
        batchnorm: which batch normalises the bound pass (see :class:`BatchNormPolicy`).
    """

    min_eps: float = 1e-6
    batchnorm: BatchNormPolicy = BatchNormPolicy.CLEAN_BATCH

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_eps) and 0 < self.min_eps <= 1):
            raise ValueError(f"min_eps must lie in (0, 1] (pixel units), got {self.min_eps}")


@dataclass(frozen=True, slots=True)
class WarmupLoss:
    """The natural warm-up step of Shi et al. 2021: the loss is ``CE(f(x), y)``; inside a
    :class:`Regularized` with active Shi terms, one IBP pass over
    ``[x - r, x + r] ∩ [0, 1]``, ``r = max(eps, min_eps)``, gives them the bounds to read (its
    margins enter no loss). Without such a listener no bound pass runs: it is then the
    standard loss.

    Example::

        loss = Regularized(WarmupLoss(), RegularizerConfig(tightness=0.5, relu_balance=0.5))
        out = loss(model, x, y, eps=0.0)     # CE + 0.5 (L_tight + L_relu) on a 1e-6 box
    """

    config: WarmupConfig = field(default_factory=WarmupConfig)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> LossOutput:
        check_batch(x, y, eps)
        radius: float | Tensor = (
            torch.as_tensor(eps, dtype=x.dtype, device=x.device).clamp(min=self.config.min_eps)
            if isinstance(eps, Tensor) else max(float(eps), self.config.min_eps)
        )
        with clean_pass(model, x, self.config.batchnorm) as logits:
            if is_recording():
                ibp_margins(model, x, y, radius, logits.shape[1])
        natural = cross_entropy(logits, y)
        metrics = {"natural_loss": natural.detach(), "natural_accuracy": accuracy(logits, y)}
        return LossOutput(loss=natural, logits=logits, metrics=metrics)
