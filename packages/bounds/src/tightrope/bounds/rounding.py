"""A priori floating-point error bounds for pre-activation boxes, and the closing rule.

Every bound of this package is sound in exact arithmetic. Computed in floating point, each
inner product carries a rounding error, and at large magnitudes these errors dwarf any fixed
tolerance (a ReLU net with weights 1e4 on a box of 1e8 computes its float32 interval centre
from terms of 1e12 that cancel to -1). The values that close a sample or a subdomain carry
their own rigorous error (:mod:`tightrope.bounds.certificate`); the pre-activation boxes their
relaxations are built on must hold for the real values too. :meth:`Rounding.widen` bounds the
error of a pre-activation box computed by IBP, CROWN or alpha-CROWN (no split multipliers), on
any sub-box of a given box, from quantities known before it is computed:

* the unit roundoff ``u`` of the working dtype (``2^-11`` for float32 on CUDA when TF32 is
  allowed, since convolutions and products then round their inputs to 10 mantissa bits);
* the standard inner-product error bound (Higham, *Accuracy and Stability of Numerical
  Algorithms*, 2nd ed., Lemma 3.1 and eq. 3.5): ``|fl(a . b) - a . b| <= gamma_n |a| . |b|``
  with ``gamma_n = n u / (1 - n u)``, in any summation order (blocking, FMA and vectorised
  kernels included); ``n`` is bounded by the largest per-sample tensor plus the rows;
* magnitudes ``m_i`` of every layer, from the "absolute network" run forward from
  ``m_0 = max(|lower|, |upper|)``: ``m_{i+1} = |W_i| m_i + |b_i|`` through affine maps and
  ``m_{i+1} = m_i`` through ReLUs. Every value the algorithms form at layer ``i`` (activations,
  interval ends, relaxation intercepts) is at most ``m_i`` in size and every backward
  coefficient row ``A_i`` obeys ``|A_i| <= |e_j| |W_k| ... |W_i|`` (ReLU slopes lie in
  ``[0, 1]``), so every product term of a row ``e_j`` at layer ``k`` is at most ``m_k[j]``;
* underflow: every magnitude is floored at ``n * tiny / u`` (``tiny`` the smallest normal
  number), so a flushed denormal, input or result, is itself below ``u`` times a counted term.

Per affine layer the backward pass forms at most ten rounded quantities per term (the product
with ``W^T``, the bias term, the relaxation's slope, intercept and line, the running sum, the
final Hölder step), each off by at most ``gamma_n`` times that layer's share of the total. An
earlier (unwidened) box's error ``delta_q`` enters through its relaxation at most as
``|A_q| . delta_q <= 2 c_q gamma m``, which makes the factor recursive over ReLU layers:
``c_p = 10 (affine ops before p + 1) + 2 sum_{q < p} c_q``; the box is widened by
``2 c_p gamma m_p``, and by ``inf`` when that overflows. :func:`sound_lower` is the closing
rule: ``lower - error`` rounded down, and ``-inf`` for anything NaN or infinite.

The factor is generous by design: in float64 it widens the last layer of mnistfc 256x6 by 0.5
against median widths of 600; in float32 it is about ``1e-2`` to ``1`` of the magnitudes, which
is why verifiers compute their boxes in float64 (``packages/bounds/README.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from tightrope.bounds.core import Box
from tightrope.bounds.network import Affine, Network, expect_relu

__all__ = ["Rounding", "rounding", "sound_lower", "unit_roundoff"]

#: Rounded quantities per term and affine layer (see the module docstring).
ERRORS_PER_LAYER = 10


def unit_roundoff(dtype: torch.dtype, device: torch.device | str = "cpu") -> float:
    """The unit roundoff ``u`` of arithmetic in ``dtype`` on ``device`` (half the machine
    epsilon; TF32's ``2^-11`` for float32 on CUDA while PyTorch allows TF32 there)."""
    if not dtype.is_floating_point:
        raise TypeError(f"unit_roundoff needs a floating dtype, got {dtype}")
    unit = torch.finfo(dtype).eps / 2
    if dtype == torch.float32 and torch.device(device).type == "cuda" and (
        torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    ):
        unit = 2.0**-11
    return unit


@dataclass(frozen=True, slots=True)
class Rounding:
    """A priori error bounds for pre-activation boxes on one network over sub-boxes of one box.

    Attributes:
        gamma: ``gamma_n`` of the working dtype (``inf`` when ``n u >= 1/2``).
        factors: per ReLU op index, the factor ``c_p`` of a row bounding its pre-activation.
        magnitudes: per ReLU op index, ``m`` of its pre-activation, ``(B, *S_i)``.
    """

    gamma: float
    factors: Mapping[int, float]
    magnitudes: Mapping[int, Tensor]

    def widen(self, index: int, box: Box) -> Box:
        """``box`` (pre-activation bounds of ReLU op ``index``, ``(B, *S_i)``, computed by IBP,
        CROWN or alpha-CROWN without split multipliers) widened by the error bound of its rows
        ``+e_j``/``-e_j``: ``2 c_p gamma m``."""
        magnitude = self.magnitudes[index].expand_as(box.lower)
        slack = magnitude * (2 * self.factors[index] * self.gamma)
        if not math.isfinite(self.gamma * self.factors[index]):
            slack = torch.full_like(magnitude, math.inf)
        return Box(box.lower - slack, box.upper + slack)


def rounding(net: Network, box: Box, rows: int = 1) -> Rounding:
    """The error bounds of bounds on ``net`` over sub-boxes of ``box`` (``(B, *S_in)``),
    for specifications of up to ``rows`` rows, in the dtype and on the device of ``net``."""
    net.require_chain("rounding")
    like = net.like
    unit = unit_roundoff(like.dtype, like.device)
    length = max(_numel(s) for s in net.shapes) + rows + 2
    gamma = length * unit / (1 - length * unit) if length * unit < 0.5 else math.inf
    floor = length * torch.finfo(like.dtype).tiny / unit
    # The magnitude pass rounds too (at most gamma per layer, relative): inflating each layer
    # by (1 + 2 gamma) keeps it an upper bound; overflow gives inf, which refuses everything.
    inflate = 1 + 2 * gamma if math.isfinite(gamma) else math.inf
    with torch.no_grad():
        m = torch.maximum(box.lower.abs(), box.upper.abs()).to(like).clamp(min=floor)
        m = torch.where(torch.isnan(m), torch.full_like(m, math.inf), m)
        magnitudes: dict[int, Tensor] = {}
        factors: dict[int, float] = {}
        affine_before = 0
        earlier = 0.0
        for index, op in enumerate(net.ops):
            if isinstance(op, Affine):
                offset = net.offset(index).abs()
                m = (op.apply_abs(m) + offset) * inflate
                m = torch.where(torch.isnan(m), torch.full_like(m, math.inf), m).clamp(min=floor)
                affine_before += 1
                continue
            expect_relu(op, "rounding")
            magnitudes[index] = m
            factor = ERRORS_PER_LAYER * (affine_before + 1) + 2 * earlier
            factors[index] = factor
            earlier += factor
    if affine_before * gamma >= 0.5:  # the growth factor (1 + gamma)^a <= 2 fails
        gamma = math.inf
    return Rounding(gamma, factors, magnitudes)


def sound_lower(lower: Tensor, allowance: Tensor) -> Tensor:
    """``lower - allowance`` rounded down, and ``-inf`` wherever either is NaN or infinite.

    The result is a lower bound that holds in exact arithmetic; comparing it with a margin is
    the one way a bound closes anything.
    """
    finite = torch.isfinite(lower) & torch.isfinite(allowance)
    value = torch.nextafter(lower - allowance, lower.new_full((), -math.inf))
    return torch.where(finite & ~torch.isnan(value), value,
                       lower.new_full((), -math.inf))


def _numel(shape: tuple[int, ...]) -> int:
    size = 1
    for extent in shape:
        size *= extent
    return size
