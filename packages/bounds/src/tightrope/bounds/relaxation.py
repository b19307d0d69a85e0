"""Linear relaxations of ReLU, the one nonlinearity with hand-written rules.

For a pre-activation ``z`` in ``[l, u]`` the relaxation is a pair of lines
``a z <= relu(z) <= s z + t``. Stable neurons are exact (``l >= 0``: ``a = s = 1, t = 0``;
``u <= 0``: ``a = s = t = 0``). An unstable neuron (``l < 0 < u``) gets the upper chord
``s = u / (u - l)``, ``t = -s l`` (Zhang et al. 2018, "Efficient Neural Network Robustness
Certification with General Activation Functions"; Wong & Kolter 2018) and a lower line through
the origin with any slope ``a`` in ``[0, 1]``, chosen by a :class:`LowerSlope` policy or
optimised (alpha-CROWN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tightrope.bounds import fused
from tightrope.bounds.core import Box, LowerSlope

__all__ = ["LowerSlope", "ReluRelaxation", "SplitReluRelaxation", "relu_relaxation"]


@dataclass(frozen=True, slots=True)
class ReluRelaxation:
    """Lines ``lower_slope * z <= relu(z) <= upper_slope * z + upper_intercept``, each ``(B, *S)``.

    ``unstable`` marks neurons with ``l < 0 < u``: the only ones where ``lower_slope`` may vary.
    """

    lower_slope: Tensor
    upper_slope: Tensor
    upper_intercept: Tensor
    unstable: Tensor

    def split(self, size: int) -> tuple[ReluRelaxation, ...]:
        """The relaxations of consecutive groups of ``size`` samples (views, no copies).

        Each tensor is split once, so under autograd the gradients of all groups meet in one
        concatenation (slicing per group would give every group a full-size zero gradient).
        """
        parts = [torch.split(t, size) for t in (self.lower_slope, self.upper_slope,
                                                 self.upper_intercept, self.unstable)]
        return tuple(ReluRelaxation(*group) for group in zip(*parts, strict=True))


@dataclass(frozen=True, slots=True)
class SplitReluRelaxation(ReluRelaxation):
    """A :class:`ReluRelaxation` on branch-and-bound subdomains with beta-CROWN's split term
    (Wang et al. 2021): ``split_term: (B, K, *S)``, ``beta_j s_j`` per row and neuron, is
    subtracted from the coefficient on the pre-activation after the relaxation step (the
    graph backward pass reads it; see :mod:`tightrope.bounds.beta`)."""

    split_term: Tensor

    def split(self, size: int) -> tuple[ReluRelaxation, ...]:
        raise NotImplementedError("SplitReluRelaxation is not split into sample groups")


def relu_relaxation(
    pre_activation: Box, policy: LowerSlope = LowerSlope.ADAPTIVE
) -> ReluRelaxation:
    """The relaxation of ``relu`` on ``pre_activation`` with lower slopes from ``policy``.

    Differentiable in the bounds; one fused pass (and one for the gradient) when
    :func:`~tightrope.bounds.compile_kernels` is on.
    """
    if not isinstance(policy, LowerSlope):
        raise TypeError(f"policy must be a LowerSlope, got {policy!r}")
    return ReluRelaxation(*fused.relu_relaxation(pre_activation.lower, pre_activation.upper,
                                                 policy))
