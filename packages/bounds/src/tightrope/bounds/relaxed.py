"""CROWN with lower slopes chosen by the caller.

Any lower slope in ``[0, 1]`` for an unstable ReLU gives a sound bound, so methods that pick
the slopes by their own criterion — e.g. Lee et al. 2021 ("Towards Better Understanding of
Training Certifiably Robust Models against Adversarial Examples"), who pick 0 or 1 per neuron
by one signed-gradient step on the training loss — need only the relaxed network and a way to
bound it with given slopes. :func:`relax` builds it once (intermediate bounds and upper lines
fixed); :meth:`Relaxed.lower` back-substitutes with any slopes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tightrope.bounds.backward import lower_bound
from tightrope.bounds.core import Box
from tightrope.bounds.fused import relu_interval
from tightrope.bounds.interval import tail_bounds
from tightrope.bounds.linear import (
    Intermediate,
    PreActivations,
    _output_bounds,
    _output_spec,
    pre_activation_bounds,
)
from tightrope.bounds.problem import Problem, prepare
from tightrope.bounds.relaxation import LowerSlope

__all__ = ["Relaxed", "relax"]


@dataclass(frozen=True, slots=True)
class Relaxed:
    """The linear relaxation of ``C f`` over a box, with the lower slopes left open.

    ReLUs are listed in network order. ``unstable[i]`` and ``default_slopes[i]`` have the
    shape ``(B, *S_i)`` of the i-th ReLU's input; stable neurons' slopes are exact (0 or 1)
    and cannot be changed.
    """

    problem: Problem
    pre: PreActivations
    spec: Tensor
    relu_ops: tuple[int, ...]

    @property
    def unstable(self) -> tuple[Tensor, ...]:
        """Masks of the neurons whose lower slope is free, one per ReLU."""
        return tuple(self.pre.relaxations[i].unstable for i in self.relu_ops)

    @property
    def default_slopes(self) -> tuple[Tensor, ...]:
        """The slopes of the policy given to :func:`relax`, one ``(B, *S_i)`` per ReLU."""
        return tuple(self.pre.relaxations[i].lower_slope for i in self.relu_ops)

    @property
    def pre_activations(self) -> tuple[Box, ...]:
        """The intermediate bounds the relaxation was built on, one per ReLU."""
        return tuple(self.pre.boxes[i] for i in self.relu_ops)

    def lower(self, slopes: Sequence[Tensor] | None = None) -> Tensor:
        """Lower bounds ``(B, K)`` of ``C f`` with the given lower slopes.

        Args:
            slopes: one tensor per ReLU, ``(B, *S_i)`` (one slope per neuron) or
                ``(B, K, *S_i)`` (per neuron and specification row), values in ``[0, 1]``;
                only the unstable neurons' values are used. ``None``: the default slopes.
                Gradients flow to the slopes and to the model's parameters.

        Raises:
            ValueError: on a wrong number of tensors, a wrong shape, or a value outside
                ``[0, 1]`` (which would make the bound unsound).
        """
        net = self.problem.net
        if slopes is None:
            # crown's own output pass (in sample groups on CPU).
            found = _output_bounds(self.problem, self.pre, upper=False).lower
            return found.reshape(found.shape[0], -1)
        if len(slopes) != len(self.relu_ops):
            raise ValueError(
                f"expected {len(self.relu_ops)} slope tensors (one per ReLU), got {len(slopes)}"
            )
        rows = self.spec.shape[1]
        chosen: dict[int, Tensor] = {}
        for position, (index, slope) in enumerate(zip(self.relu_ops, slopes, strict=True)):
            relaxation = self.pre.relaxations[index]
            shape = relaxation.lower_slope.shape
            if slope.shape == shape:
                slope = slope.unsqueeze(1)
            elif slope.shape != (shape[0], rows, *shape[1:]):
                raise ValueError(
                    f"slopes[{position}] must have shape {tuple(shape)} or "
                    f"{(shape[0], rows, *shape[1:])}, got {tuple(slope.shape)}"
                )
            if bool(((slope < 0) | (slope > 1)).any()):
                raise ValueError(f"slopes[{position}] has values outside [0, 1]: unsound")
            unstable = relaxation.unstable.unsqueeze(1)
            chosen[index] = torch.where(unstable, slope, relaxation.lower_slope.unsqueeze(1))
        return lower_bound(net, len(net.ops), self.spec, self.problem.box,
                           self.pre.relaxations, chosen)

    def interval_lower(self) -> Tensor:
        """Lower bounds ``(B, K)`` of ``C f`` by interval arithmetic from the last ReLU's
        pre-activation bounds: with ``intermediate=Intermediate.IBP`` this is
        ``ibp(model, box, C).lower`` without a second interval pass (CROWN-IBP training mixes
        the two bounds)."""
        if self.relu_ops:
            box = self.pre.boxes[self.relu_ops[-1]]
            center, radius = relu_interval(box.center, box.radius)
            start = self.relu_ops[-1] + 1
        else:
            center, radius, start = self.problem.box.center, self.problem.box.radius, 0
        return tail_bounds(self.problem.net, self.spec, center, radius, start).lower


def relax(
    model: nn.Module,
    box: Box,
    C: Tensor | None = None,
    *,
    intermediate: Intermediate = Intermediate.IBP,
    lower_slope: LowerSlope = LowerSlope.ADAPTIVE,
) -> Relaxed:
    """The relaxation of ``C f`` over ``box`` that :func:`crown` bounds, slopes left open.

    ``relax(model, box, C, intermediate=Intermediate.IBP).lower()`` equals
    ``crown_ibp(model, box, C, upper=False).lower`` (reshaped to ``(B, K)``).

    Args:
        model: a chain of supported affine layers and ReLUs (every ``nn.Sequential`` of
            them); graphs raise ``NotImplementedError``.
        box: input box ``(B, *S_in)``.
        C: ``(B, K, n_out)`` or ``(K, n_out)``; ``None`` bounds every output.
        intermediate: pre-activation bounds by ``Intermediate.IBP`` (default, CROWN-IBP) or
            ``Intermediate.CROWN``.
        lower_slope: the policy of :attr:`Relaxed.default_slopes`.
    """
    problem = prepare(model, box, C)
    pre = pre_activation_bounds(problem.net, box, intermediate, lower_slope)
    spec = _output_spec(problem)
    return Relaxed(problem, pre, spec, tuple(problem.net.relu_indices))
