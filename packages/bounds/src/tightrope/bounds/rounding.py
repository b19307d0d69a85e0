"""A priori floating-point error bounds: when a computed lower bound is a proof.

Every bound of this package is sound in exact arithmetic. Computed in floating point, each
inner product carries a rounding error, and at large magnitudes these errors dwarf any fixed
tolerance (a ReLU net with weights 1e4 on a box of 1e8 computes its float32 interval centre
from terms of 1e12 that cancel to -1). This module bounds the error of *any* bound the package
computes (IBP, CROWN, CROWN-IBP, alpha-CROWN, beta-CROWN with its split multipliers, on any
sub-box of a given box) from quantities known before the bound is computed:

* the unit roundoff ``u`` of the working dtype (``2^-11`` for float32 on CUDA when TF32 is
  allowed, since convolutions and products then round their inputs to 10 mantissa bits);
* the standard inner-product error bound (Higham, *Accuracy and Stability of Numerical
  Algorithms*, 2nd ed., Lemma 3.1 and eq. 3.5): ``|fl(a . b) - a . b| <= gamma_n |a| . |b|``
  with ``gamma_n = n u / (1 - n u)``, in any summation order (blocking, FMA and vectorised
  kernels included); ``n`` is bounded by the largest per-sample tensor plus the rows;
* magnitudes ``m_i`` of every layer, from the "absolute network" run forward from
  ``m_0 = max(|lower|, |upper|)``: ``m_{i+1} = |W_i| m_i + |b_i|`` through affine maps and
  ``m_{i+1} = m_i`` through ReLUs. Every value any of the algorithms forms at layer ``i``
  (activations, interval ends, relaxation intercepts) is at most ``m_i`` in size, every
  backward coefficient row ``A_i`` obeys ``|A_i| <= |C| |W_L| ... |W_i|`` (ReLU slopes lie in
  ``[0, 1]``), so every product term is at most ``|C| m_L`` in total, plus the split
  multipliers' ``sum_k |beta_k| . m_k`` for beta-CROWN;
* underflow: every magnitude is floored at ``n * tiny / u`` (``tiny`` the smallest normal
  number), so a flushed denormal, input or result, is itself below ``u`` times a counted term.

Per affine layer the backward pass forms at most ten rounded quantities per term (the product
with ``W^T``, the bias term, the relaxation's slope, intercept and line, the running sum, the
final Hölder step), each off by at most ``gamma_n`` times that layer's share of the total. An
intermediate bound's error ``delta_k`` enters the output's bound through the relaxation at most
as ``|A_k| . delta_k <= 2 c_k gamma M``, which makes the factor recursive over ReLU layers:
``c_p = 10 (affine ops before p + 1) + 2 sum_{q < p} c_q``. The allowance of a row is then
``c gamma (|C| m_L + |b| + sum_k |beta_k| . m_k)``, rounded up. A bound closes a
subdomain or a sample only when ``lower - allowance`` exceeds the margin, and a NaN or infinite
bound, magnitude or allowance never does: :func:`sound_lower` maps them to ``-inf``.

The factor is generous by design: in float64 it stays below ``1e-9`` of the magnitudes on the
networks of VNN-COMP's MNIST and CIFAR benchmarks; in float32 it is about ``1e-2`` to ``1`` of
them, which is why verifiers compute their bounds in float64 (``packages/bounds/README.md``).
Intermediate bounds from beta-CROWN searches (split multipliers on earlier layers) are not
covered by the recursion and must be widened by their own allowance
(:meth:`Rounding.allowance` with ``at`` and ``betas``) before they are used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from tightrope.bounds.core import Box
from tightrope.bounds.network import Affine, Network

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
    """Error bounds for every bound on one network over sub-boxes of one box.

    Attributes:
        gamma: ``gamma_n`` of the working dtype (``inf`` when ``n u >= 1/2``).
        factors: per ReLU op index, the factor ``c_p`` of a row bounding its pre-activation.
        output_factor: the factor of a row bounding the output.
        magnitudes: per ReLU op index, ``m`` of its pre-activation, ``(B, *S_i)``.
        output: ``m`` of the output, ``(B, *S_out)``.
    """

    gamma: float
    factors: Mapping[int, float]
    output_factor: float
    magnitudes: Mapping[int, Tensor]
    output: Tensor

    def allowance(
        self,
        C: Tensor,
        offsets: Tensor | None = None,
        betas: Mapping[int, Tensor] | None = None,
        at: int | None = None,
    ) -> Tensor:
        """``(B, K)``: a bound on the rounding error of any computed lower bound of
        ``C z - offsets``, where ``z`` is the output (or, with ``at``, the pre-activation of
        ReLU op ``at``).

        Args:
            C: ``(B, K, *S)`` or ``(K, *S)`` rows on ``z``.
            offsets: ``(K,)`` or ``(B, K)`` constants subtracted from the rows.
            betas: split multipliers per ReLU op, ``(B, K or 1, *S_i)``, as the beta-CROWN
                bound used them (:attr:`SplitBound.betas`).
            at: a ReLU op index, for rows on its pre-activation.
        """
        factor = self.output_factor if at is None else self.factors[at]
        magnitude = self.output if at is None else self.magnitudes[at]
        if C.dim() == magnitude.dim():
            C = C.unsqueeze(0)
        total = _rows_dot(C.abs(), magnitude)
        if offsets is not None:
            total = total + offsets.abs()
        for index, beta in (betas or {}).items():
            if at is None or index < at:
                total = total + _rows_dot(beta.abs(), self.magnitudes[index])
        if not math.isfinite(self.gamma * factor):
            return torch.full_like(total, math.inf)
        # The sums above are rounded too: the factor 2 covers them many times over.
        return total * (2 * factor * self.gamma)

    def widen(self, index: int, box: Box, betas: Mapping[int, Tensor] | None = None) -> Box:
        """``box`` (pre-activation bounds of ReLU op ``index``, ``(B, *S_i)``) widened by the
        allowance of its rows ``+e_j``/``-e_j`` (with ``betas`` of the earlier layers)."""
        magnitude = self.magnitudes[index]
        total = magnitude.expand_as(box.lower)
        for earlier, beta in (betas or {}).items():
            if earlier < index:
                share = _rows_dot(beta.abs(), self.magnitudes[earlier]).amax(dim=1)
                total = total + share.view(-1, *([1] * (box.lower.dim() - 1)))
        slack = total * (2 * self.factors[index] * self.gamma)
        if not math.isfinite(self.gamma * self.factors[index]):
            slack = torch.full_like(total, math.inf)
        return Box(box.lower - slack, box.upper + slack)


def rounding(net: Network, box: Box, rows: int = 1) -> Rounding:
    """The error bounds of bounds on ``net`` over sub-boxes of ``box`` (``(B, *S_in)``),
    for specifications of up to ``rows`` rows, in the dtype and on the device of ``net``."""
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
            magnitudes[index] = m
            factor = ERRORS_PER_LAYER * (affine_before + 1) + 2 * earlier
            factors[index] = factor
            earlier += factor
    output_factor = ERRORS_PER_LAYER * (affine_before + 1) + 2 * earlier
    if affine_before * gamma >= 0.5:  # the growth factor (1 + gamma)^a <= 2 fails
        gamma = math.inf
    return Rounding(gamma, factors, output_factor, magnitudes, m)


def sound_lower(lower: Tensor, allowance: Tensor) -> Tensor:
    """``lower - allowance`` rounded down, and ``-inf`` wherever either is NaN or infinite.

    The result is a lower bound that holds in exact arithmetic; comparing it with a margin is
    the one way a bound closes anything.
    """
    finite = torch.isfinite(lower) & torch.isfinite(allowance)
    value = torch.nextafter(lower - allowance, lower.new_full((), -math.inf))
    return torch.where(finite & ~torch.isnan(value), value,
                       lower.new_full((), -math.inf))


def _rows_dot(rows: Tensor, magnitude: Tensor) -> Tensor:
    """``(B, K)``: ``rows: (B or 1, K, *S)`` (non-negative) times ``magnitude: (B or 1, *S)``."""
    flat = rows.flatten(2)
    vector = magnitude.flatten(1).to(flat.dtype).unsqueeze(1)
    return (flat * vector).sum(dim=2)


def _numel(shape: tuple[int, ...]) -> int:
    size = 1
    for extent in shape:
        size *= extent
    return size
