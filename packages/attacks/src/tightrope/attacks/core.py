"""Shared vocabulary of the attacks: results, objectives, the model context and input checks.

Shapes: ``B`` is the batch, ``K`` the number of classes, ``*S`` one sample's feature shape.
Margins follow the convention of ``tightrope.bounds``: ``z_y - z_j`` for ``j != y``, so a
point is robustly classified when every margin is positive and an attack *minimises* them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attack",
    "AttackResult",
    "ModelMode",
    "Objective",
    "fold_batchnorm",
    "frozen_model",
    "margins",
    "objective_values",
]


class Objective(Enum):
    """The per-sample function an attack maximises.

    * ``CE`` — cross-entropy ``logsumexp(z) - z_y``;
    * ``MARGIN`` — ``max_{j != y} z_j - z_y`` (the negated classification margin, CW-style);
    * ``DLR`` — difference of logits ratio of Croce & Hein (2020),
      ``-(z_y - max_{j != y} z_j) / (z_(1) - z_(3))`` with ``z_(i)`` the sorted logits;
      invariant to shifting and scaling the logits; needs ``K >= 3``.
    """

    CE = "ce"
    MARGIN = "margin"
    DLR = "dlr"


class ModelMode(Enum):
    """How an attack sets the model's train/eval mode while it runs (restored afterwards).

    * ``EVAL`` — every module in eval mode (BatchNorm uses its running statistics, Dropout is
      off); the default, and what SABR and the expressive losses do for their attacks.
    * ``KEEP`` — leave the modes as they are. A BatchNorm in train mode then normalises with
      the statistics of the attacked batch, couples the samples and updates its running
      statistics at every attack step; only use this when the model takes care of that.
    """

    EVAL = "eval"
    KEEP = "keep"


@dataclass(frozen=True, slots=True)
class AttackResult:
    """What an attack found, per sample.

    Attributes:
        x_adv: ``(B, *S)`` the best point found, inside the attacked set; detached.
        success: ``(B,)`` bool, True where ``x_adv`` violates the margin specification, i.e.
            ``max_{j != y} z_j >= z_y`` (ties count as broken, as a verifier needs every
            margin strictly positive).
        loss: ``(B,)`` the attack's objective at ``x_adv``; detached.
    """

    x_adv: Tensor
    success: Tensor
    loss: Tensor

    @property
    def robust(self) -> Tensor:
        """``(B,)`` bool, True where the attack failed (``~success``)."""
        return ~self.success


class Attack(Protocol):
    """Anything that attacks ``model`` in the l_inf ball of radius ``eps`` around ``x``.

    Every attack config of this package (e.g. ``PGDConfig(steps=8)``) is an ``Attack``.
    """

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        eps: float | Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> AttackResult: ...


@contextlib.contextmanager
def frozen_model(model: nn.Module, *, mode: ModelMode = ModelMode.EVAL) -> Iterator[nn.Module]:
    """Run an attack on ``model`` without touching its state.

    Inside the block every parameter has ``requires_grad=False`` (so no parameter gradient is
    computed or accumulated) and, for ``ModelMode.EVAL``, every module is in eval mode. On exit
    the ``training`` flag of every submodule and the ``requires_grad`` flag of every parameter
    are restored to what they were, also when the block raises.

    Yields the module to attack: for ``ModelMode.EVAL``, :func:`fold_batchnorm` of ``model``
    (the same function with eval-mode BatchNorms folded into the layers before them: one
    element-wise pass fewer per BatchNorm, forward and backward); ``model`` itself otherwise.
    """
    modes = [(module, module.training) for module in model.modules()]
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        if mode is ModelMode.EVAL:
            model.eval()
            yield fold_batchnorm(model)
        else:
            yield model
    finally:
        for module, training in modes:
            module.training = training
        for parameter, requires_grad in flags:
            parameter.requires_grad_(requires_grad)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every eval-mode BatchNorm that directly follows a ``Conv2d`` (or a
    ``Linear``) in an ``nn.Sequential`` folded into that layer's weight and bias.

    The result computes the same function as ``model`` in eval mode (up to float rounding) with
    one element-wise pass fewer per BatchNorm. Its tensors are computed without gradient from
    the current parameters: build it afresh after the parameters change. ``model`` is not
    modified, and is returned itself when there is nothing to fold (not an ``nn.Sequential``,
    BatchNorm in train mode or without running statistics, layer subclasses, non-zero padding
    modes).
    """
    if type(model) is not nn.Sequential:
        return model
    children = list(model)
    layers: list[nn.Module] = []
    changed = False
    index = 0
    while index < len(children):
        following = children[index + 1] if index + 1 < len(children) else None
        folded = _fold_pair(children[index], following)
        if folded is not None:
            layers.append(folded)
            changed = True
            index += 2
            continue
        layers.append(fold_batchnorm(children[index]))
        changed = changed or layers[-1] is not children[index]
        index += 1
    return nn.Sequential(*layers) if changed else model


class _FoldedConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class _FoldedLinear(nn.Module):
    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def _fold_pair(layer: nn.Module, norm: nn.Module | None) -> nn.Module | None:
    """The fold of ``norm`` into ``layer``, or None when the pair does not fold."""
    if type(layer) is nn.Conv2d:
        if type(norm) is not nn.BatchNorm2d or layer.padding_mode != "zeros":
            return None
        if isinstance(layer.padding, str):
            return None
    elif type(layer) is nn.Linear:
        if type(norm) is not nn.BatchNorm1d:
            return None
    else:
        return None
    assert isinstance(norm, nn.BatchNorm1d | nn.BatchNorm2d)  # narrowed by the checks above
    mean, var = norm.running_mean, norm.running_var
    if norm.training or mean is None or var is None or norm.num_features != layer.weight.shape[0]:
        return None
    with torch.no_grad():
        scale = torch.rsqrt(var + norm.eps)
        shift = -mean * scale
        if norm.weight is not None:
            scale = scale * norm.weight
            shift = shift * norm.weight
        if norm.bias is not None:
            shift = shift + norm.bias
        bias = shift if layer.bias is None else layer.bias * scale + shift
        weight = layer.weight * scale.view(-1, *([1] * (layer.weight.dim() - 1)))
    if isinstance(layer, nn.Conv2d):
        return _FoldedConv2d(layer, weight, bias)
    return _FoldedLinear(weight, bias)


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """The classification margin ``z_y - max_{j != y} z_j`` per sample.

    Args:
        logits: ``(B, K)`` with ``K >= 2``.
        y: ``(B,)`` integer labels.

    Returns:
        ``(B,)``; positive where ``y`` is the unique top class.
    """
    true_logit = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    return true_logit - _best_other(logits, y)


def objective_values(logits: Tensor, y: Tensor, objective: Objective) -> Tensor:
    """The per-sample ``objective`` (to be maximised) of ``logits: (B, K)`` at labels ``y``."""
    if objective is Objective.CE:
        return F.cross_entropy(logits, y, reduction="none")
    true_logit = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    violation = _best_other(logits, y) - true_logit
    if objective is Objective.MARGIN:
        return violation
    if logits.shape[1] < 3:
        raise ValueError(
            f"the DLR objective needs at least 3 classes, got {logits.shape[1]}; "
            "use Objective.MARGIN (equivalent up to scale) or Objective.CE"
        )
    top = logits.topk(3, dim=1).values
    # The small constant keeps the ratio finite when the three top logits coincide.
    return violation / (top[:, 0] - top[:, 2] + 1e-12)


def _best_other(logits: Tensor, y: Tensor) -> Tensor:
    """``max_{j != y} z_j`` per sample."""
    masked = logits.scatter(1, y.unsqueeze(1), float("-inf"))
    return masked.max(dim=1).values


# ---------------------------------------------------------------------------------------------
# Internal helpers shared by the attack modules.


@dataclass(frozen=True, slots=True)
class Inputs:
    """Validated inputs of an l_inf attack: the attacked set is ``[lower, upper]``."""

    x: Tensor
    y: Tensor
    eps: Tensor  # the radius of every coordinate, expanded to x's shape (a view)
    lower: Tensor
    upper: Tensor

    def rows(self, index: Tensor) -> Inputs:
        """The inputs of the rows ``index`` (sorted, unique); ``self`` when that is every row."""
        if index.numel() == self.x.shape[0]:
            return self
        return Inputs(
            x=self.x[index],
            y=self.y[index],
            eps=self.eps[index],
            lower=self.lower[index],
            upper=self.upper[index],
        )


def prepare_inputs(
    x: Tensor, y: Tensor, eps: float | Tensor, domain: tuple[float, float] | None
) -> Inputs:
    """Check ``x``, ``y`` and ``eps`` and build the box ``[x - eps, x + eps] ∩ domain``."""
    x = x.detach()
    y = check_labels(x, y)
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device).detach()
    if eps_t.dim() == 1 and x.dim() > 1 and eps_t.shape[0] == x.shape[0]:
        eps_t = eps_t.view(-1, *([1] * (x.dim() - 1)))
    try:
        eps_t = eps_t.expand_as(x)
    except RuntimeError:
        raise ValueError(
            f"eps must be a float, a (B,) tensor or broadcastable to x {tuple(x.shape)}, "
            f"got shape {tuple(eps_t.shape)}"
        ) from None
    if not bool(torch.isfinite(eps_t).all()) or bool((eps_t < 0).any()):
        raise ValueError(f"eps must be finite and non-negative, got {eps}")
    lower, upper = x - eps_t, x + eps_t
    if domain is not None:
        low, high = domain
        if bool((x < low).any()) or bool((x > high).any()):
            raise ValueError(
                f"x must lie in the input domain [{low}, {high}]; normalise inside the model "
                "(e.g. a Normalize first layer) or pass domain=None in the config"
            )
        lower, upper = lower.clamp(low, high), upper.clamp(low, high)
    return Inputs(x=x, y=y, eps=eps_t, lower=lower, upper=upper)


def check_labels(x: Tensor, y: Tensor) -> Tensor:
    """Check ``x`` is a floating ``(B, ...)`` batch and ``y`` its ``(B,)`` integer labels."""
    if torch.is_inference_mode_enabled():
        # Under inference mode autograd records nothing: every gradient would be zero.
        raise RuntimeError(
            "attacks need autograd: call them outside torch.inference_mode() "
            "(torch.no_grad() is fine)"
        )
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension: shape (B, *S)")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape (B,) = ({x.shape[0]},), got {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype is torch.bool or y.is_complex():
        raise TypeError(f"y must hold integer class labels, got {y.dtype}")
    if y.device != x.device:
        raise ValueError(f"x and y must be on one device, got {x.device} and {y.device}")
    return y.detach().long()


def check_domain(domain: tuple[float, float] | None) -> None:
    if domain is not None and not domain[0] <= domain[1]:
        raise ValueError(f"domain must be (low, high) with low <= high, got {domain}")


def check_generator(generator: torch.Generator | None, needed: bool, x: Tensor) -> None:
    """Randomness comes only from a passed generator: require one where it is used."""
    if not needed:
        return
    if generator is None:
        raise ValueError(
            "this attack draws random points: pass generator=torch.Generator(device=x.device)"
            ".manual_seed(seed), or turn random_start off and use restarts=1"
        )
    if generator.device.type != x.device.type:
        raise ValueError(
            f"the generator is on {generator.device} but x is on {x.device}: create it with "
            "torch.Generator(device=x.device)"
        )


def check_logits(logits: Tensor, y: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[0] != y.shape[0]:
        raise ValueError(
            f"the model must return logits of shape (B, K) = ({y.shape[0]}, K), got "
            f"{tuple(logits.shape)}"
        )
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ValueError(f"the model must return at least 2 logits per sample, got {num_classes}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]"
        )


def uniform_in_box(lower: Tensor, upper: Tensor, generator: torch.Generator | None) -> Tensor:
    """A point drawn uniformly from the box ``[lower, upper]`` (same shape as ``lower``)."""
    noise = torch.rand(lower.shape, generator=generator, dtype=lower.dtype, device=lower.device)
    # In place: the TAPS estimators draw B * (K - 1) points, so temporaries count.
    return project_(noise.mul_(upper - lower).add_(lower), lower, upper)


def project(x: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """Clip ``x`` elementwise into ``[lower, upper]`` (the l_inf projection onto a box)."""
    return torch.minimum(torch.maximum(x, lower), upper)


def project_(x: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """:func:`project` in place on ``x`` (which must not be needed unclipped); returns ``x``."""
    torch.maximum(x, lower, out=x)
    return torch.minimum(x, upper, out=x)


def broadcast_rows(values: Tensor, like: Tensor) -> Tensor:
    """View per-row ``values: (*R,)`` as ``(*R, 1, ..., 1)`` to broadcast against ``(*R, *S)``."""
    return values.view(*values.shape, *([1] * (like.dim() - values.dim())))
