"""Bounds on any graph that are proofs in floating point: the graph counterpart of
:mod:`tightrope.bounds.certificate`.

* :func:`graph_sound_interval` — interval arithmetic whose radius grows, per op, by a rigorous
  bound on the op's own rounding error (``2 gamma`` times the magnitude of what it computed);
* :func:`graph_certified_lower` — the Lagrangian dual bound of ``A z_value`` at the
  multipliers a CROWN pass forms (Wong & Kolter 2018), every term evaluated with its rounding
  error bounded. Each op contributes ``min over its feasible inputs of
  (mu_out . out - sum_in lambda_in . in)``, with ``mu`` the coefficient on its output and
  ``lambda_in`` those it passes back: for an affine map ``mu . b`` up to the error of the
  transpose; for a ReLU the exact per-neuron minimum over its box (at ``l``, ``u`` or 0); for
  max pooling the constant of DeepPoly's relaxation on the box, which holds for the exact
  scatter of ``mu`` it passes back (up to that scatter's rounding); joins and concatenations
  pass ``mu`` on exactly, and a value several ops read sums their coefficients (up to that
  sum's rounding). Weak duality makes the total a lower bound for any multipliers, given
  valid boxes of the relaxed ops' inputs;
* :func:`graph_certified_bounds` — the pipeline a verifier closes with: sound interval boxes,
  each relaxed op's input tightened by certified CROWN rows, then the certified bound of
  ``C f``.

The error terms follow Higham's ``gamma_n`` model as in :mod:`tightrope.bounds.certificate`;
results are ``value - error`` rounded down, ``-inf`` for anything NaN or infinite.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import Tensor

from tightrope.bounds.certificate import _finite_or_inf, _gamma
from tightrope.bounds.core import Box, LowerSlope, features_dot
from tightrope.bounds.fused import relu_step_eager
from tightrope.bounds.graph import (
    MaxPoolRelaxation,
    Relaxation,
    box_relaxations,
    max_pool_relaxation,
    nonlinear_indices,
    optimise_row_slopes,
    relaxation_of,
    row_chunk,
    row_slopes,
    selector_rows,
    tighten_neurons,
    with_row_slopes,
)
from tightrope.bounds.network import (
    Add,
    Affine,
    Concat,
    MaxPool,
    Network,
    Op,
    Relu,
    rule_for,
    transpose_rows,
)
from tightrope.bounds.relaxation import ReluRelaxation
from tightrope.bounds.rounding import sound_lower

__all__ = [
    "CERTIFIED_RULES",
    "MAGNITUDE_RULES",
    "SOUND_INTERVAL_RULES",
    "CertifiedRoot",
    "graph_alpha_bounds",
    "graph_certified_bounds",
    "graph_certified_lower",
    "graph_certified_root",
    "graph_sound_interval",
]

Interval: TypeAlias = tuple[Tensor, Tensor]


# --- Sound interval domain -------------------------------------------------------------------


def _inflate(center: Tensor, radius: Tensor, gamma: float) -> Interval:
    """The interval with its radius grown by ``2 gamma (|c| + r)``: its own rounding."""
    return center, radius + 2 * gamma * _finite_or_inf(center.abs() + radius)


def _sound_affine(net: Network, index: int, op: Op, args: list[Interval],
                  gamma: float) -> Interval:
    assert isinstance(op, Affine)
    (center, radius), = args
    slack = op.apply_abs(_finite_or_inf(center.abs() + radius)) + net.offset(index).abs()
    return op.apply(center), op.apply_abs(radius) + 2 * gamma * slack


def _sound_relu(net: Network, index: int, op: Op, args: list[Interval],
                gamma: float) -> Interval:
    (center, radius), = args
    lower, upper = torch.relu(center - radius), torch.relu(center + radius)
    return _inflate((upper + lower) / 2, (upper - lower) / 2, gamma)


def _sound_add(net: Network, index: int, op: Op, args: list[Interval],
               gamma: float) -> Interval:
    (c1, r1), (c2, r2) = args
    return _inflate(c1 + c2, r1 + r2, gamma)


def _sound_concat(net: Network, index: int, op: Op, args: list[Interval],
                  gamma: float) -> Interval:
    assert isinstance(op, Concat)
    return (torch.cat([c for c, _ in args], dim=op.dim + 1),
            torch.cat([r for _, r in args], dim=op.dim + 1))


def _sound_max_pool(net: Network, index: int, op: Op, args: list[Interval],
                    gamma: float) -> Interval:
    assert isinstance(op, MaxPool)
    (center, radius), = args
    lower, upper = op.apply(center - radius), op.apply(center + radius)
    return _inflate((upper + lower) / 2, (upper - lower) / 2, gamma)


SoundIntervalRule: TypeAlias = Callable[[Network, int, Op, list[Interval], float], Interval]
SOUND_INTERVAL_RULES: dict[type, SoundIntervalRule] = {
    Affine: _sound_affine,
    Relu: _sound_relu,
    Add: _sound_add,
    Concat: _sound_concat,
    MaxPool: _sound_max_pool,
}


def _pre_box(center: Tensor, radius: Tensor, gamma: float) -> Box:
    """A valid box of the value ``center -/+ radius`` (forming the ends rounds too)."""
    slack = radius + 2 * gamma * _finite_or_inf(center.abs() + radius)
    return Box(center - slack, center + slack)


def graph_sound_interval(
    net: Network, box: Box, rows: int = 1, known: Mapping[int, Box] | None = None,
    end: int | None = None,
) -> tuple[dict[int, Box], Interval]:
    """Rigorous interval bounds: the input box of every relaxed op before ``end`` (keyed by op
    index; intersected with the valid ``known[op]`` where given, and propagated from there)
    and the interval ``(centre, radius)`` of the output of op ``end - 1``. ``rows``: the
    specification rows that will be bounded on the result (they enter ``gamma``)."""
    gamma = _gamma(net, rows)
    inputs = net.op_inputs
    end = len(net.ops) if end is None else end
    with torch.no_grad():
        values: list[Interval] = [_inflate(box.center, box.radius, gamma)]
        boxes: dict[int, Box] = {}
        for index in range(end):
            op = net.ops[index]
            args = [values[v] for v in inputs[index]]
            if isinstance(op, (Relu, MaxPool)):
                pre = _pre_box(*args[0], gamma)
                if known is not None and index in known:
                    pre = pre.intersect(known[index])
                boxes[index] = pre
                # Intersected ends are exact; the rules' own inflation covers their midpoints.
                args = [(pre.center, pre.radius)]
            rule = rule_for(SOUND_INTERVAL_RULES, op, "sound interval propagation")
            values.append(rule(net, index, op, args, gamma))
    return boxes, values[-1]


# --- Certified dual domain -------------------------------------------------------------------


@dataclass
class _Pass:
    """One certified backward pass: the running constant and error, and what it reads."""

    net: Network
    boxes: Mapping[int, Box]
    relaxations: Mapping[int, Relaxation]
    magnitudes: list[Tensor]
    value: Tensor
    error: Tensor
    #: Given Lagrange multipliers on ReLU pre-activations (beta-CROWN's); CROWN's elsewhere.
    multipliers: Mapping[int, Tensor]


def _certified_affine(state: _Pass, index: int, op: Op, A: Tensor) -> list[Tensor]:
    assert isinstance(op, Affine)
    net = state.net
    batch, rows = A.shape[0], A.shape[1]
    state.value = state.value + features_dot(A, net.offset(index))
    state.error = state.error + features_dot(A.abs(), state.magnitudes[index + 1])
    in_shape = net.in_shape(index)
    return [transpose_rows(op, A.flatten(0, 1), in_shape).view(batch, rows, *in_shape)]


def _certified_relu(state: _Pass, index: int, op: Op, A: Tensor) -> list[Tensor]:
    box = state.boxes[index]
    # The multiplier on the pre-activation: the given one, else CROWN's (any value keeps the
    # bound valid).
    given = state.multipliers.get(index)
    if given is not None:
        lam = given
    else:
        relaxation = state.relaxations[index]
        assert isinstance(relaxation, ReluRelaxation)
        lam, _ = relu_step_eager(A, A.new_zeros(A.shape[:2]), row_slopes(relaxation, A),
                                 relaxation.upper_slope, relaxation.upper_intercept)
    lower, upper = box.lower.unsqueeze(1), box.upper.unsqueeze(1)
    at_lower = A * torch.relu(lower) - lam * lower
    at_upper = A * torch.relu(upper) - lam * upper
    least = torch.minimum(at_lower, at_upper)
    least = torch.where((lower < 0) & (upper > 0), torch.clamp(least, max=0.0), least)
    state.value = state.value + least.flatten(2).sum(dim=2)
    magnitude = torch.maximum(box.lower.abs(), box.upper.abs())
    state.error = state.error + features_dot(A.abs() + lam.abs(), magnitude)
    return [lam]


def _certified_add(state: _Pass, index: int, op: Op, A: Tensor) -> list[Tensor]:
    return [A, A]


def _certified_concat(state: _Pass, index: int, op: Op, A: Tensor) -> list[Tensor]:
    assert isinstance(op, Concat)
    sizes = [state.net.shapes[v][op.dim] for v in state.net.op_inputs[index]]
    return list(torch.split(A, sizes, dim=op.dim + 2))


def _certified_max_pool(state: _Pass, index: int, op: Op, A: Tensor) -> list[Tensor]:
    assert isinstance(op, MaxPool)
    # Rebuilt from the valid box: the constant below holds only for that box's facts.
    relaxation: MaxPoolRelaxation = max_pool_relaxation(op, state.boxes[index])
    batch, rows, channels = A.shape[0], A.shape[1], A.shape[2]
    in_shape = state.net.in_shape(index)
    exact = relaxation.exact.unsqueeze(1)
    through = torch.where(exact, A, A.clamp(min=0))
    state.value = state.value + features_dot(torch.where(exact, 0.0, A.clamp(max=0)),
                                             relaxation.upper)
    # The scatter's rounding: each passed coefficient times a magnitude of its window, and
    # the constant's products.
    window = op.apply(state.magnitudes[state.net.op_inputs[index][0]])
    state.error = state.error + features_dot(A.abs(), window + relaxation.upper.abs())
    index_map = relaxation.chosen.unsqueeze(1).expand(batch, rows, channels, -1)
    lam = A.new_zeros((batch, rows, channels, in_shape[1] * in_shape[2]))
    lam = lam.scatter_add(3, index_map, through.flatten(3))
    return [lam.view(batch, rows, *in_shape)]


CertifiedRule: TypeAlias = Callable[[_Pass, int, Op, Tensor], list[Tensor]]
CERTIFIED_RULES: dict[type, CertifiedRule] = {
    Affine: _certified_affine,
    Relu: _certified_relu,
    Add: _certified_add,
    Concat: _certified_concat,
    MaxPool: _certified_max_pool,
}


MagnitudeRule: TypeAlias = Callable[[Network, int, Op, list[Tensor], Mapping[int, Box], float],
                                    Tensor]


def _magnitude_affine(net: Network, index: int, op: Op, args: list[Tensor],
                      boxes: Mapping[int, Box], inflate: float) -> Tensor:
    assert isinstance(op, Affine)
    return _finite_or_inf(op.apply_abs(args[0]) + net.offset(index).abs()) * inflate


def _magnitude_relu(net: Network, index: int, op: Op, args: list[Tensor],
                    boxes: Mapping[int, Box], inflate: float) -> Tensor:
    return torch.relu(boxes[index].upper)


def _magnitude_add(net: Network, index: int, op: Op, args: list[Tensor],
                   boxes: Mapping[int, Box], inflate: float) -> Tensor:
    return _finite_or_inf(args[0] + args[1]) * inflate


def _magnitude_concat(net: Network, index: int, op: Op, args: list[Tensor],
                      boxes: Mapping[int, Box], inflate: float) -> Tensor:
    assert isinstance(op, Concat)
    return torch.cat(args, dim=op.dim + 1)


def _magnitude_max_pool(net: Network, index: int, op: Op, args: list[Tensor],
                        boxes: Mapping[int, Box], inflate: float) -> Tensor:
    assert isinstance(op, MaxPool)
    return op.apply(args[0])


#: Upper bounds on ``|output|`` of each op kind from those of its inputs (and the valid box of
#: a relaxed op's input), for the rounding-error terms of the certified pass.
MAGNITUDE_RULES: dict[type, MagnitudeRule] = {
    Affine: _magnitude_affine,
    Relu: _magnitude_relu,
    Add: _magnitude_add,
    Concat: _magnitude_concat,
    MaxPool: _magnitude_max_pool,
}


def _magnitudes(net: Network, box: Box, boxes: Mapping[int, Box], end: int,
                gamma: float) -> list[Tensor]:
    """Upper bounds on ``|z_v|`` for the values ``0..end``, each ``(B or 1, *S_v)``."""
    inflate = 1 + 2 * gamma
    found = [torch.maximum(box.lower.abs(), box.upper.abs())]
    inputs = net.op_inputs
    for index in range(end):
        op = net.ops[index]
        rule = rule_for(MAGNITUDE_RULES, op, "the certified pass's magnitudes")
        found.append(rule(net, index, op, [found[v] for v in inputs[index]], boxes, inflate))
    return found


def graph_certified_lower(
    net: Network,
    value: int,
    A: Tensor,
    box: Box,
    boxes: Mapping[int, Box],
    relaxations: Mapping[int, Relaxation],
    offsets: Tensor | None = None,
    multipliers: Mapping[int, Tensor] | None = None,
) -> Tensor:
    """Sound lower bounds ``(B, K)`` of ``A z_value - offsets`` over ``box`` from the dual at
    CROWN's multipliers, or at given ones (see the module docstring).

    Args:
        A: ``(B, K, *shapes[value])`` rows on value ``value`` (the output: ``len(net.ops)``).
        box: input boxes ``(B or 1, *S_in)``.
        boxes: valid input boxes ``(B or 1, *S_i)`` of every relaxed op before ``value`` (e.g.
            from :func:`graph_sound_interval` or earlier certified rows; clamped to the
            splits on branch-and-bound subdomains).
        relaxations: relaxations of those ops (they choose the multipliers of the ReLUs not in
            ``multipliers`` only).
        offsets: ``(K,)`` or ``(B, K)`` constants subtracted from the rows.
        multipliers: ``lambda_i: (B, K, *S_i)`` per ReLU op ``i`` on its pre-activation (e.g.
            :attr:`tightrope.bounds.SplitBound.pre_coefficients`).
    """
    batch, rows = A.shape[0], A.shape[1]
    gamma = _gamma(net, rows)
    inputs = net.op_inputs
    with torch.no_grad():
        state = _Pass(net, boxes, relaxations, _magnitudes(net, box, boxes, value, gamma),
                      A.new_zeros((batch, rows)), A.new_zeros((batch, rows)),
                      {} if multipliers is None else multipliers)
        pending: dict[int, Tensor] = {value: A}
        for index in range(value - 1, -1, -1):
            coefficients = pending.pop(index + 1, None)
            if coefficients is None:
                continue
            op = net.ops[index]
            rule = rule_for(CERTIFIED_RULES, op, "the certified backward pass")
            for source, part in zip(inputs[index], rule(state, index, op, coefficients),
                                    strict=True):
                found = pending.get(source)
                if found is None:
                    pending[source] = part
                    continue
                # The sum's rounding, at most one unit of each term's magnitude.
                state.error = state.error + features_dot(found.abs() + part.abs(),
                                                         state.magnitudes[source])
                pending[source] = found + part
        result, error = state.value, state.error
        coefficients = pending.get(0)
        if coefficients is not None:
            center, radius = box.center, box.radius
            result = result + features_dot(coefficients, center) - features_dot(
                coefficients.abs(), radius)
            error = error + features_dot(coefficients.abs(), center.abs() + radius)
        if offsets is not None:
            result = result - offsets
            error = error + offsets.abs()
        error = (error + result.abs()) * (4 * gamma)
    return sound_lower(result, _finite_or_inf(error))


#: Upper limit on the elements of one coefficient tensor of the certified intermediate rows.
ROW_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True, slots=True)
class CertifiedRoot:
    """Valid input boxes of every relaxed op (sound interval bounds tightened by certified
    CROWN rows) and their relaxations: what every certified bound on a region starts from."""

    boxes: dict[int, Box]
    relaxations: dict[int, Relaxation]

    def select(self, samples: Tensor) -> CertifiedRoot:
        """The root of the samples ``samples`` (indices into the batch) only."""
        boxes = {i: Box(b.lower[samples], b.upper[samples]) for i, b in self.boxes.items()}
        relaxations: dict[int, Relaxation] = {}
        for index, relaxation in self.relaxations.items():
            kind = type(relaxation)
            relaxations[index] = kind(*(getattr(relaxation, f)[samples]
                                        for f in kind.__dataclass_fields__))
        return CertifiedRoot(boxes, relaxations)


def graph_certified_root(net: Network, box: Box, rows: int = 1,
                         lower_slope: LowerSlope = LowerSlope.ADAPTIVE) -> CertifiedRoot:
    """The :class:`CertifiedRoot` of ``net`` over ``box``: each relaxed op in order gets the
    sound interval of its input from the tightened boxes before it, intersected with certified
    CROWN bounds on its loose neurons. ``rows``: the specification rows to be bounded."""
    relaxations: dict[int, Relaxation] = {}
    tight: dict[int, Box] = {}
    for index in nonlinear_indices(net):
        pre, _ = graph_sound_interval(net, box, rows, known=tight, end=index + 1)
        tight[index] = _tightened(net, index, box, {**tight, index: pre[index]}, relaxations)
        relaxations[index] = relaxation_of(net.ops[index], tight[index], lower_slope)
    return CertifiedRoot(tight, relaxations)


def graph_certified_bounds(
    net: Network,
    box: Box,
    C: Tensor,
    offsets: Tensor | None = None,
    crown: bool = True,
    lower_slope: LowerSlope = LowerSlope.ADAPTIVE,
    root: CertifiedRoot | None = None,
) -> Tensor:
    """Sound lower bounds ``(B, K)`` of ``C f(x) - offsets`` over ``box``: the better of the
    sound interval bound and (with ``crown``) the certified CROWN bound over ``root`` (computed
    when not given). ``C: (B or 1, K, *S_out)``."""
    rows = C.shape[1]
    _, (center, radius) = graph_sound_interval(net, box, rows)
    batch = box.lower.shape[0]
    C = C.expand(batch, *C.shape[1:])
    gamma = _gamma(net, rows)
    with torch.no_grad():
        value = features_dot(C, center) - features_dot(C.abs(), radius)
        error = features_dot(C.abs(), center.abs() + radius)
        if offsets is not None:
            value, error = value - offsets, error + offsets.abs()
        interval = sound_lower(value, _finite_or_inf((error + value.abs()) * (4 * gamma)))
    if not crown:
        return interval
    if root is None:
        root = graph_certified_root(net, box, rows, lower_slope)
    found = graph_certified_lower(net, len(net.ops), C, box, root.boxes, root.relaxations,
                                  offsets)
    return torch.maximum(found, interval)


def graph_alpha_bounds(
    net: Network, box: Box, C: Tensor, root: CertifiedRoot, offsets: Tensor | None = None, *,
    steps: int = 20, lr: float = 0.1, deadline: float | None = None,
    search: Network | None = None,
) -> Tensor:
    """Sound lower bounds ``(B, K)`` of ``C f(x) - offsets`` from alpha-CROWN's slopes
    (:func:`~tightrope.bounds.graph.optimise_row_slopes`, ``steps`` Adam steps on the output
    bound over ``root``'s boxes), evaluated by :func:`graph_certified_lower`. ``search``: a
    lowering of the same model (e.g. in float32) on which the slopes are searched (``net``
    when ``None``); only the evaluation runs in ``net``'s dtype."""
    batch = box.lower.shape[0]
    C = C.expand(batch, *C.shape[1:])
    search = net if search is None else search
    dtype = search.like.dtype
    relaxations = root.relaxations
    if dtype != net.like.dtype:
        relaxations = box_relaxations(search, {i: Box(b.lower.to(dtype), b.upper.to(dtype))
                                               for i, b in root.boxes.items()})
    slopes = optimise_row_slopes(search, C.to(dtype), Box(box.lower.to(dtype),
                                                         box.upper.to(dtype)),
                                 relaxations, steps=steps, lr=lr, deadline=deadline)
    relaxations = with_row_slopes(root.relaxations, {i: s.to(net.like.dtype)
                                                     for i, s in slopes.items()})
    return graph_certified_lower(net, len(net.ops), C, box, root.boxes, relaxations, offsets)


def _tightened(net: Network, index: int, box: Box, boxes: Mapping[int, Box],
               relaxations: Mapping[int, Relaxation]) -> Box:
    """``boxes[index]`` intersected with certified CROWN bounds on its loose neurons (the
    unstable ones for a ReLU, every one of positive width for max pooling)."""
    value = net.op_inputs[index][0]
    if value == 0:
        return boxes[index]
    known = boxes[index]
    batch, shape = known.lower.shape[0], net.shapes[value]

    def bound(neurons: Tensor) -> Tensor:
        rows = selector_rows(neurons, batch, shape, known.lower)
        return graph_certified_lower(net, value, torch.cat([rows, -rows], dim=1), box, boxes,
                                     relaxations)

    return tighten_neurons(known, isinstance(net.ops[index], Relu),
                           row_chunk(net, value, batch, ROW_CHUNK_ELEMENTS), bound)
