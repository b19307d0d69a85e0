"""The backward (back-substitution) pass shared by CROWN, CROWN-IBP and alpha-CROWN.

Given linear functions ``A z_end`` of the output of op ``end - 1``, the pass carries them back
to the network input: affine ops by their transpose (a vector-Jacobian product) and ReLUs by
their relaxations, choosing per coefficient sign the line that keeps a *lower* bound
(Zhang et al. 2018, CROWN; Singh et al. 2019, DeepPoly). Upper bounds are lower bounds of the
negated functions, so one mechanism serves both.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from tightrope.bounds.core import Box, concretize_lower, features_dot
from tightrope.bounds.fused import relu_step
from tightrope.bounds.network import Affine, Network, Op, expect_relu, transpose_rows
from tightrope.bounds.relaxation import ReluRelaxation

__all__ = ["backward_lower", "input_lower_bound", "lower_bound", "relu_step"]


def backward_lower(
    net: Network,
    end: int,
    A: Tensor,
    relaxations: Mapping[int, ReluRelaxation],
    lower_slopes: Mapping[int, Tensor] | None = None,
    start: int = 0,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Back-substitute ``A z_end`` from the output of op ``end - 1`` to the input of op ``start``.

    Args:
        net: the lowered network.
        end: ``A`` multiplies the output of op ``end - 1`` (per-sample shape ``net.shapes[end]``).
        A: ``(B, K, *net.shapes[end])`` coefficients.
        relaxations: the relaxation of every ReLU op in ``[start, end)``, keyed by op index.
        lower_slopes: optional per-row lower slopes ``(B, K, *S)`` replacing those of
            ``relaxations`` (alpha-CROWN), keyed by op index.
        start: the op whose input the result refers to.
        bias: ``(B, K)`` constant already accumulated (default zero).

    Returns:
        ``(A_in, bias)`` with ``A_in: (B, K, *net.shapes[start])`` and ``bias: (B, K)`` such that
        ``A z_end >= A_in z_start + bias`` whenever every ReLU pre-activation lies in the box its
        relaxation was built on.
    """
    batch, rows = A.shape[0], A.shape[1]
    if bias is None:
        bias = A.new_zeros((batch, rows))
    for index in range(end - 1, start - 1, -1):
        op = net.ops[index]
        if isinstance(op, Affine):
            bias = bias + features_dot(A, net.offset(index))
            flat = transpose_rows(op, A.flatten(0, 1), net.shapes[index])
            A = flat.view(batch, rows, *net.shapes[index])
        else:
            expect_relu(op, "backward_lower")
            relaxation = relaxations[index]
            if lower_slopes is not None and index in lower_slopes:
                lower_slope = lower_slopes[index]
            else:
                lower_slope = relaxation.lower_slope
                if _channels_last(A):
                    lower_slope = lower_slope.contiguous(memory_format=torch.channels_last)
                lower_slope = lower_slope.unsqueeze(1)
            upper_slope = relaxation.upper_slope
            if _channels_last(A):
                upper_slope = upper_slope.contiguous(memory_format=torch.channels_last)
            A, bias = relu_step(A, bias, lower_slope, upper_slope, relaxation.upper_intercept)
    return A, bias


def _channels_last(A: Tensor) -> bool:
    """Whether ``A: (B, K, C, H, W)`` is laid out channels-last (as fast transposes leave it)."""
    return A.dim() == 5 and not A.is_contiguous() and A.permute(0, 1, 3, 4, 2).is_contiguous()


def lower_bound(
    net: Network,
    end: int,
    A: Tensor,
    box: Box,
    relaxations: Mapping[int, ReluRelaxation],
    lower_slopes: Mapping[int, Tensor] | None = None,
    start: int = 0,
) -> Tensor:
    """``min A z_end`` over ``z_start`` in ``box``, through the relaxations: ``(B, K)``."""
    if start == 0:
        return input_lower_bound(net, end, A, box, relaxations, lower_slopes)
    A_in, bias = backward_lower(net, end, A, relaxations, lower_slopes, start)
    return concretize_lower(A_in, bias, box)


def input_lower_bound(
    net: Network,
    end: int,
    A: Tensor,
    box: Box,
    relaxations: Mapping[int, ReluRelaxation],
    lower_slopes: Mapping[int, Tensor] | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """``min A z_end + bias`` over the network's input ``box``: ``(B, K)``.

    :func:`backward_lower` to the input and Hölder's inequality, except that the leading ops
    that never mix coordinates (a ``Normalize``) carry the box forward instead of the rows back
    (interval arithmetic is exact through them, and the box is K times smaller), and a first
    mixing op with a ``concretize`` rule bounds its rows over its input box itself.
    """
    first = 0
    while first < end and _elementwise(net.ops[first]):
        first += 1
    center, radius = box.center, box.radius
    for op in net.ops[:first]:
        assert isinstance(op, Affine)
        center, radius = op.apply(center), op.apply_abs(radius)
    mixing = net.ops[first] if first < end else None
    if isinstance(mixing, Affine) and mixing.concretize is not None:
        A_out, bias = backward_lower(net, end, A, relaxations, lower_slopes, first + 1, bias)
        bias = bias + features_dot(A_out, net.offset(first))
        return mixing.concretize(A_out, center, radius) + bias
    A_in, bias = backward_lower(net, end, A, relaxations, lower_slopes, first, bias)
    return features_dot(A_in, center) - features_dot(A_in.abs(), radius) + bias


def _elementwise(op: Op) -> bool:
    return isinstance(op, Affine) and not op.mixing


def both_sides(net: Network, end: int, C: Tensor, box: Box,
               relaxations: Mapping[int, ReluRelaxation], start: int = 0) -> Box:
    """Lower and upper bounds of ``C z_end``: ``(B, K)``.

    One backward pass over the rows ``[C; -C]``; the affine ops after the last ReLU before
    ``end`` are the same for both halves, so they are passed once before the rows are doubled.
    """
    rows = C.shape[1]
    split = max((i + 1 for i in net.relu_indices if start <= i < end), default=start)
    A, bias = backward_lower(net, end, C, {}, start=split)
    doubled, bias = torch.cat([A, -A], dim=1), torch.cat([bias, -bias], dim=1)
    if start == 0:
        bounds = input_lower_bound(net, split, doubled, box, relaxations, bias=bias)
    else:
        A_in, bias = backward_lower(net, split, doubled, relaxations, start=start, bias=bias)
        bounds = concretize_lower(A_in, bias, box)
    return Box(bounds[:, :rows], -bounds[:, rows:])
