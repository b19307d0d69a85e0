"""Lower bounds that are proofs in floating point: rigorous evaluation with error terms.

A verifier may only close a sample or a subdomain with a bound that holds for the real-valued
network, whatever the rounding of the arithmetic that produced it. The two functions here
evaluate a bound together with a rigorous bound on its own rounding error and return
``value - error`` rounded down (:func:`tightrope.bounds.rounding.sound_lower`; ``-inf`` for
anything NaN or infinite):

* :func:`sound_interval` — interval arithmetic (Gowal et al. 2018) whose radius grows, per
  affine map, by ``2 gamma_n (|W| m + |b|)`` with ``m = |c| + r`` the magnitude of the interval;
* :func:`dual_lower` — the Lagrangian dual bound of ``C f(x)`` for given multipliers
  ``lambda_i`` on every ReLU pre-activation ``z_i`` (Wong & Kolter 2018; Dvijotham et al.
  2018). Weak duality makes it a lower bound for *any* multipliers, given valid pre-activation
  boxes: with ``rho_i = W_i^T lambda_{i+1}`` the coefficient on ReLU ``i``'s output,
  ``rho_i . relu(z_i) >= sum_j min over z in [l_j, u_j] of (rho_ij relu(z) - lambda_ij z)
  + lambda_i . z_i``, and the minimum of that piecewise-linear function sits at ``l``, ``u`` or
  ``0``. CROWN, alpha-CROWN and beta-CROWN are this bound with the multipliers their backward
  pass forms (the coefficient on ``z_i`` after the relaxation step and the split terms; their
  relaxation lines make it no tighter), so evaluating it at their multipliers certifies their
  result, never below it in exact arithmetic.

Rounding is accounted for per term (Higham, *Accuracy and Stability of Numerical Algorithms*,
Lemma 3.1): a computed ``rho = fl(W^T lambda)`` differs from ``W^T lambda`` by at most
``gamma_n |W|^T |lambda|``, so using it costs at most ``gamma_n |lambda| . (|W| m + |b|)``
where ``m`` bounds the layer's input values (from the boxes); the per-neuron minima, the
bias products, the running sum and the final Hölder step are each bounded the same way. The
pre-activation boxes must themselves be valid (widen computed ones with
:meth:`tightrope.bounds.rounding.Rounding.widen`, or compute them with these functions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from tightrope.bounds.core import Box, features_dot
from tightrope.bounds.network import Affine, Network, expect_relu, transpose_rows
from tightrope.bounds.rounding import sound_lower, unit_roundoff

__all__ = ["dual_lower", "sound_interval"]


def _gamma(net: Network, rows: int) -> float:
    length = max(math.prod(s) for s in net.shapes) + rows + 4 * len(net.ops) + 4
    unit = unit_roundoff(net.like.dtype, net.like.device)
    return length * unit / (1 - length * unit) if length * unit < 0.5 else math.inf


def _finite_or_inf(t: Tensor) -> Tensor:
    return torch.where(torch.isnan(t), torch.full_like(t, math.inf), t)


def sound_interval(net: Network, box: Box, C: Tensor, offsets: Tensor | None = None) -> Tensor:
    """Sound lower bounds ``(B, K)`` of ``C f(x) - offsets`` over ``box`` by interval arithmetic.

    As :func:`tightrope.bounds.ibp`, the affine ops after the last ReLU are applied to the rows
    (``C`` folded into the last layer), the rest to the interval.
    ``C: (B or 1, K, *S_out)``, ``offsets: (K,)`` or ``(B, K)``.
    """
    net.require_chain("sound_interval")
    gamma = _gamma(net, C.shape[1])
    last = max(net.relu_indices, default=-1)
    with torch.no_grad():
        center, radius = box.center, box.radius
        # The centre and radius of the box itself are rounded: one unit each, relative.
        radius = radius + 2 * gamma * (center.abs() + radius)
        for index, op in enumerate(net.ops[: last + 1]):
            if isinstance(op, Affine):
                magnitude = _finite_or_inf(center.abs() + radius)
                slack = op.apply_abs(magnitude) + net.offset(index).abs()
                center, radius = op.apply(center), op.apply_abs(radius) + 2 * gamma * slack
                continue
            expect_relu(op, "sound_interval")
            lower, upper = torch.relu(center - radius), torch.relu(center + radius)
            center, radius = (upper + lower) / 2, (upper - lower) / 2
            radius = radius + 2 * gamma * (center.abs() + radius)
        batch = center.shape[0]
        rows = C.expand(batch, *C.shape[1:])
        magnitude = _finite_or_inf(center.abs() + radius)
        A, value, error = _affine_tail(net, last + 1, rows, magnitude)
        value = value + features_dot(A, center) - features_dot(A.abs(), radius)
        error = error + features_dot(A.abs(), magnitude)
        if offsets is not None:
            value = value - offsets
            error = error + offsets.abs()
        error = (error + value.abs()) * (4 * gamma)
    return sound_lower(value, _finite_or_inf(error))


def _affine_tail(
    net: Network, start: int, C: Tensor, magnitude: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The rows ``C`` on the output carried back through the affine ops from ``start`` on
    (no ReLU among them), given the ``magnitude`` of op ``start``'s input: the rows on that
    input, the constant term and the sum of absolute products (the error terms, unscaled)."""
    batch, rows = C.shape[0], C.shape[1]
    outputs = []
    gamma = _gamma(net, rows)
    for index in range(start, len(net.ops)):
        op = net.ops[index]
        assert isinstance(op, Affine)
        magnitude = _finite_or_inf(op.apply_abs(magnitude) + net.offset(index).abs())
        magnitude = magnitude * (1 + 2 * gamma)
        outputs.append(magnitude)
    A = C
    value = C.new_zeros((batch, rows))
    error = C.new_zeros((batch, rows))
    for index in range(len(net.ops) - 1, start - 1, -1):
        op = net.ops[index]
        assert isinstance(op, Affine)
        value = value + features_dot(A, net.offset(index))
        error = error + features_dot(A.abs(), outputs[index - start])
        A = transpose_rows(op, A.flatten(0, 1), net.shapes[index]).view(
            batch, rows, *net.shapes[index])
    return A, value, error


def dual_lower(
    net: Network,
    box: Box,
    C: Tensor,
    boxes: Mapping[int, Box],
    multipliers: Mapping[int, Tensor],
    offsets: Tensor | None = None,
) -> Tensor:
    """Sound lower bounds ``(D, K)`` of ``C f(x) - offsets`` over ``box`` from the Lagrangian
    dual at the given multipliers (see the module docstring).

    Args:
        net: the lowered network (a graph goes to
            :func:`~tightrope.bounds.graph_certificate.graph_certified_lower`).
        box: input boxes ``(D or 1, *S_in)``.
        C: ``(D, K, *S_out)`` rows.
        boxes: valid pre-activation bounds ``(D or 1, *S_i)`` per ReLU op (split-clamped on
            branch-and-bound subdomains), and on a graph per max pooling op too.
        multipliers: ``lambda_i: (D, K, *S_i)`` per ReLU op, e.g.
            :attr:`tightrope.bounds.SplitBound.pre_coefficients`.
        offsets: ``(K,)`` or ``(D, K)`` constants subtracted from the rows.
    """
    if not net.is_relu_chain:
        from tightrope.bounds.graph_certificate import graph_certified_lower

        return graph_certified_lower(net, len(net.ops), C, box, boxes, {}, offsets,
                                     multipliers=multipliers)
    batch, rows = C.shape[0], C.shape[1]
    gamma = _gamma(net, rows)
    with torch.no_grad():
        # Magnitudes of every op's input over the region, reset at each ReLU by its box.
        magnitude = torch.maximum(box.lower.abs(), box.upper.abs())
        inputs: list[Tensor] = []
        for index, op in enumerate(net.ops):
            inputs.append(magnitude)
            if isinstance(op, Affine):
                magnitude = op.apply_abs(magnitude) + net.offset(index).abs()
                magnitude = _finite_or_inf(magnitude) * (1 + 2 * gamma)
            else:
                expect_relu(op, "dual_lower")
                magnitude = torch.relu(boxes[index].upper)
        A = C
        value = C.new_zeros((batch, rows))
        error = C.new_zeros((batch, rows))
        for index in range(len(net.ops) - 1, -1, -1):
            op = net.ops[index]
            output_magnitude = inputs[index + 1] if index + 1 < len(inputs) else magnitude
            if isinstance(op, Affine):
                value = value + features_dot(A, net.offset(index))
                error = error + features_dot(A.abs(), output_magnitude)
                A = transpose_rows(op, A.flatten(0, 1), net.shapes[index]).view(
                    batch, rows, *net.shapes[index])
                continue
            rho, lam = A, multipliers[index]
            lower, upper = boxes[index].lower.unsqueeze(1), boxes[index].upper.unsqueeze(1)
            at_lower = rho * torch.relu(lower) - lam * lower
            at_upper = rho * torch.relu(upper) - lam * upper
            least = torch.minimum(at_lower, at_upper)
            least = torch.where((lower < 0) & (upper > 0), torch.clamp(least, max=0.0), least)
            value = value + least.flatten(2).sum(dim=2)
            pre_magnitude = torch.maximum(boxes[index].lower.abs(), boxes[index].upper.abs())
            error = error + features_dot(rho.abs() + lam.abs(), pre_magnitude)
            A = lam
        center, radius = box.center, box.radius
        value = value + features_dot(A, center) - features_dot(A.abs(), radius)
        error = error + features_dot(A.abs(), center.abs() + radius)
        if offsets is not None:
            value = value - offsets
            error = error + offsets.abs()
        error = (error + value.abs()) * (4 * gamma)
    return sound_lower(value, _finite_or_inf(error))
