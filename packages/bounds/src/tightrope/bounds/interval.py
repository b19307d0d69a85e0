"""Interval bound propagation (Gowal et al. 2018, "On the Effectiveness of Interval Bound
Propagation for Training Verifiably Robust Models").

Intervals travel in centre/radius form: an affine map sends ``(c, r)`` to ``(L c + b, |L| r)``,
ReLU is monotone. The specification ``C`` is folded into the trailing affine block (the layers
after the last ReLU), so the output bound is that of the single affine map ``C f`` rather than
``C`` applied to the output box (tighter; auto_LiRPA does the same).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tightrope.bounds.backward import both_sides
from tightrope.bounds.core import Box
from tightrope.bounds.network import Affine, Network
from tightrope.bounds.problem import prepare

__all__ = ["ibp", "interval_pre_activations", "propagate_interval"]


def propagate_interval(
    net: Network,
    box: Box,
    start: int = 0,
    end: int | None = None,
    pre_activations: dict[int, Box] | None = None,
) -> Box:
    """Propagate ``box`` (the input of op ``start``) to the output of op ``end - 1``.

    When ``pre_activations`` is given, the input box of every ReLU op is stored in it under the
    op's index, and a box already stored there is intersected in (callers use this to tighten
    intervals with better bounds).
    """
    end = len(net.ops) if end is None else end
    center, radius = box.center, box.radius
    for index in range(start, end):
        op = net.ops[index]
        if isinstance(op, Affine):
            center, radius = op.apply(center), op.apply_abs(radius)
            continue
        if pre_activations is None:
            # Fresh temporaries, so the in-place updates are safe under autograd.
            upper = (center + radius).relu_()
            lower = (center - radius).relu_()
        else:
            lower, upper = center - radius, center + radius
            known = pre_activations.get(index)
            if known is not None:
                lower, upper = torch.maximum(lower, known.lower), torch.minimum(upper, known.upper)
            pre_activations[index] = Box(lower, upper)
            lower, upper = torch.relu(lower), torch.relu(upper)
        center, radius = (upper + lower).mul_(0.5), (upper - lower).mul_(0.5)
    return Box.from_center_radius(center, radius)


def interval_pre_activations(net: Network, box: Box) -> dict[int, Box]:
    """IBP bounds on the input of every ReLU op, keyed by op index."""
    found: dict[int, Box] = {}
    last_relu = max(net.relu_indices, default=-1)
    propagate_interval(net, box, end=last_relu + 1, pre_activations=found)
    return found


def ibp(model: nn.Module, box: Box, C: Tensor | None = None) -> Box:
    """Interval bounds on ``C f(x)`` (or ``f(x)``) for every ``x`` in ``box``.

    Differentiable with respect to the model's parameters. Costs about two forward passes.

    Args:
        model: an ``nn.Sequential`` of supported layers (see ``supported_layers()``).
        box: input box, ``(B, *S_in)``.
        C: ``(B, K, n_out)`` or ``(K, n_out)`` specification, e.g. ``margin_spec(y, n)``.

    Returns:
        Box of shape ``(B, K)`` (or ``(B, *S_out)`` when ``C`` is None).
    """
    problem = prepare(model, box, C)
    net = problem.net
    if problem.spec is None:
        return propagate_interval(net, box)
    tail_start = max(net.relu_indices, default=-1) + 1
    tail_input = propagate_interval(net, box, end=tail_start)
    return tail_bounds(net, problem.spec, tail_input, tail_start)


def tail_bounds(net: Network, C: Tensor, tail_input: Box, tail_start: int) -> Box:
    """Bounds of ``C f`` given the box of the input of the trailing affine block."""
    batch = C.shape[0]
    A = C.view(batch, C.shape[1], *net.output_shape)
    return both_sides(net, len(net.ops), A, tail_input, {}, start=tail_start)
