"""IBP, CROWN and CROWN-IBP on any feed-forward graph (residual joins, concatenations, max
pooling), one rule table per domain.

The chain passes (:mod:`.interval`, :mod:`.backward`, :mod:`.linear`) are specialised for
chains of affine maps and ReLUs; a network of any other form comes here. Each domain has one
table keyed by op kind and dispatches through :func:`~tightrope.bounds.network.rule_for`, so an
op kind without a rule is an error that names it:

* ``INTERVAL_RULES``: an op's output interval ``(centre, radius)`` from its inputs' intervals;
* ``BACKWARD_RULES``: linear functions ``A z_out`` of an op's output carried to its inputs
  (one ``A`` per input, plus a constant), keeping them lower bounds: affine maps by their
  transpose, ReLU by its relaxation lines (Zhang et al. 2018), a join by passing ``A`` to
  every branch, max pooling by DeepPoly's relaxation (Singh et al. 2019):
  ``y >= x_j`` for the input ``j`` of the window with the largest midpoint, and
  ``y <= max_i u_i``, or ``y = x_j`` when ``l_j`` is at least every other ``u_i``.

Values that several ops read (a residual shortcut) collect the coefficients of every reader
before they are passed further back, so each op is visited once per pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor

from tightrope.bounds import patches
from tightrope.bounds.ascent import ascend_slopes
from tightrope.bounds.core import Box, LowerSlope, features_dot
from tightrope.bounds.fused import relu_step
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
from tightrope.bounds.relaxation import ReluRelaxation, SplitReluRelaxation, relu_relaxation

__all__ = [
    "BACKWARD_RULES",
    "INTERVAL_RULES",
    "MaxPoolRelaxation",
    "box_relaxations",
    "graph_backward",
    "graph_interval",
    "graph_pre_activations",
    "nonlinear_indices",
    "optimise_row_slopes",
    "output_bounds",
    "relaxation_of",
    "tail_interval_bounds",
]

Interval: TypeAlias = tuple[Tensor, Tensor]

# --- Interval domain -------------------------------------------------------------------------


def _interval_affine(net: Network, index: int, op: Op, args: list[Interval]) -> Interval:
    assert isinstance(op, Affine)
    (center, radius), = args
    return op.apply(center), op.apply_abs(radius)


def _interval_relu(net: Network, index: int, op: Op, args: list[Interval]) -> Interval:
    (center, radius), = args
    lower, upper = torch.relu(center - radius), torch.relu(center + radius)
    return (upper + lower) / 2, (upper - lower) / 2


def _interval_add(net: Network, index: int, op: Op, args: list[Interval]) -> Interval:
    (c1, r1), (c2, r2) = args
    return c1 + c2, r1 + r2


def _interval_concat(net: Network, index: int, op: Op, args: list[Interval]) -> Interval:
    assert isinstance(op, Concat)
    return (torch.cat([c for c, _ in args], dim=op.dim + 1),
            torch.cat([r for _, r in args], dim=op.dim + 1))


def _interval_max_pool(net: Network, index: int, op: Op, args: list[Interval]) -> Interval:
    assert isinstance(op, MaxPool)
    (center, radius), = args
    # Max pooling is monotone in every input: the pooled bounds bound the output.
    lower, upper = op.apply(center - radius), op.apply(center + radius)
    return (upper + lower) / 2, (upper - lower) / 2


IntervalRule: TypeAlias = Callable[[Network, int, Op, list[Interval]], Interval]
INTERVAL_RULES: dict[type, IntervalRule] = {
    Affine: _interval_affine,
    Relu: _interval_relu,
    Add: _interval_add,
    Concat: _interval_concat,
    MaxPool: _interval_max_pool,
}

#: Op kinds whose backward rule needs bounds on their input (a relaxation).
NONLINEAR: tuple[type, ...] = (Relu, MaxPool)


def nonlinear_indices(net: Network) -> tuple[int, ...]:
    """Indices of the ops that are relaxed (ReLU, max pooling), in order."""
    return tuple(i for i, op in enumerate(net.ops) if isinstance(op, NONLINEAR))


def graph_interval(
    net: Network,
    box: Box,
    end: int | None = None,
    known: Mapping[int, Box] | None = None,
    found: dict[int, Box] | None = None,
    rules: Mapping[type, IntervalRule] = INTERVAL_RULES,
    keep: bool = False,
) -> list[Interval | None]:
    """Interval bounds of every value up to the output of op ``end - 1``, as ``(centre,
    radius)``; ``None`` for values no later op needs (unless ``keep``).

    The input box of every relaxed op (ReLU, max pooling) is intersected with ``known[op]``
    when given and stored in ``found[op]`` when ``found`` is given. ``rules``: the rule table
    (``INTERVAL_RULES`` with entries replaced, e.g. SABR's shrunk ReLU).
    """
    end = len(net.ops) if end is None else end
    inputs = net.op_inputs
    last_use = _last_uses(net, end)
    values: list[Interval | None] = [(box.center, box.radius)]
    for index in range(end):
        op = net.ops[index]
        args = [values[v] for v in inputs[index]]
        assert all(a is not None for a in args)
        if isinstance(op, NONLINEAR) and (known is not None or found is not None):
            (center, radius), = args  # type: ignore[misc]
            pre = Box.from_center_radius(center, radius)
            if known is not None and index in known:
                pre = pre.intersect(known[index])
            if found is not None:
                found[index] = pre
            args = [(pre.center, pre.radius)]
        rule = rule_for(rules, op, "interval propagation")
        values.append(rule(net, index, op, args))  # type: ignore[arg-type]
        for v in inputs[index]:
            if last_use[v] == index and not keep:
                values[v] = None
    return values


def _last_uses(net: Network, end: int) -> list[int]:
    """For every value, the last op before ``end`` that reads it (``end`` for the last
    value)."""
    last = [-1] * (end + 1)
    for index, ins in enumerate(net.op_inputs[:end]):
        for v in ins:
            last[v] = index
    last[end] = end
    return last


def tail_interval_bounds(net: Network, box: Box, C: Tensor, found: dict[int, Box] | None = None,
                         rules: Mapping[type, IntervalRule] = INTERVAL_RULES) -> Box:
    """IBP bounds of ``C f`` with ``C: (B, K, n_out)`` folded into the linear ops after the last
    relaxed op (as the chain's :func:`~tightrope.bounds.tail_bounds`): the rows are carried
    back through them and bounded on the intervals of the values they reach. ``found`` and
    ``rules`` as for :func:`graph_interval`."""
    relaxed = nonlinear_indices(net)
    start = relaxed[-1] + 1 if relaxed else 0
    values = graph_interval(net, box, end=start, found=found, rules=rules)
    batch, rows = C.shape[0], C.shape[1]
    A = C.reshape(batch, rows, *net.shapes[-1])
    pending, bias = graph_backward(net, len(net.ops), A, {}, stop=start)
    lower = upper = bias
    for value, coefficients in pending.items():
        interval = values[value]
        assert interval is not None
        center, radius = interval
        mid, spread = features_dot(coefficients, center), features_dot(coefficients.abs(), radius)
        lower, upper = lower + mid - spread, upper + mid + spread
    return Box(lower, upper)


# --- Backward linear relaxation domain -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MaxPoolRelaxation:
    """DeepPoly's relaxation of one max pooling on its input box.

    ``chosen: (B, C, L)``: per output pixel (``L = H_out W_out``), the flat input pixel with the
    largest lower bound in its window; ``exact: (B, C, H_out, W_out)``: whether that input's
    lower bound is at least every other input's upper bound in the window (then the output
    equals it); ``upper: (B, C, H_out, W_out)``: the largest upper bound of the window.
    """

    chosen: Tensor
    exact: Tensor
    upper: Tensor


Relaxation: TypeAlias = ReluRelaxation | MaxPoolRelaxation


def max_pool_relaxation(op: MaxPool, pre: Box) -> MaxPoolRelaxation:
    """The relaxation of ``op`` on the box ``pre: (B, C, H, W)`` of its input."""
    batch, channels, height, width = pre.lower.shape
    (kh, kw), (sh, sw), (ph, pw) = op.kernel, op.stride, op.padding
    padding = (pw, pw, ph, ph)
    windows = []
    for bound in (pre.lower, pre.upper):
        padded = F.pad(bound, padding, value=float("-inf"))
        unfolded = F.unfold(padded.flatten(0, 1).unsqueeze(1), (kh, kw), stride=(sh, sw))
        windows.append(unfolded.view(batch, channels, kh * kw, -1))  # (B, C, k, L)
    lower, upper = windows
    # The lower line y >= x_j holds for any j of the window; j is the input with the largest
    # midpoint (DeepPoly takes the largest lower bound: the same unless those tie, as the
    # zero lower bounds of ReLU outputs do, where the upper bounds tell the inputs apart).
    position = (lower + upper).nan_to_num(nan=float("-inf")).argmax(dim=2)  # (B, C, L)
    best_lower = lower.gather(2, position.unsqueeze(2)).squeeze(2)
    others = upper.scatter(2, position.unsqueeze(2), float("-inf")).amax(dim=2)
    out_h = (height + 2 * ph - kh) // sh + 1
    out_w = (width + 2 * pw - kw) // sw + 1
    # Window pixel p of output (i, j) is input pixel (i sh - ph + p // kw, j sw - pw + p % kw).
    rows = torch.arange(out_h, device=pre.lower.device).repeat_interleave(out_w)
    columns = torch.arange(out_w, device=pre.lower.device).repeat(out_h)
    row = rows * sh - ph + torch.div(position, kw, rounding_mode="floor")
    column = columns * sw - pw + position % kw
    return MaxPoolRelaxation(
        chosen=row * width + column,
        exact=(best_lower >= others).view(batch, channels, out_h, out_w),
        upper=upper.amax(dim=2).view(batch, channels, out_h, out_w),
    )


def relaxation_of(op: Op, pre: Box, lower_slope: LowerSlope) -> Relaxation:
    """The relaxation of a relaxed op (ReLU or max pooling) on the box of its input."""
    if isinstance(op, Relu):
        return relu_relaxation(pre, lower_slope)
    if isinstance(op, MaxPool):
        return max_pool_relaxation(op, pre)
    raise NotImplementedError(f"no relaxation for op kind {type(op).__name__} ({op.name})")


def box_relaxations(net: Network, boxes: Mapping[int, Box],
                    lower_slope: LowerSlope = LowerSlope.ADAPTIVE) -> dict[int, Relaxation]:
    """The relaxation of every relaxed op (keyed by op index) on its input box."""
    return {i: relaxation_of(net.ops[i], b, lower_slope) for i, b in boxes.items()}


BackwardRule: TypeAlias = Callable[
    [Network, int, Op, Tensor, Tensor, Mapping[int, Relaxation]], tuple[list[Tensor], Tensor]
]


def _backward_affine(net: Network, index: int, op: Op, A: Tensor, bias: Tensor,
                     relaxations: Mapping[int, Relaxation]) -> tuple[list[Tensor], Tensor]:
    assert isinstance(op, Affine)
    batch, rows = A.shape[0], A.shape[1]
    bias = bias + features_dot(A, net.offset(index))
    in_shape = net.in_shape(index)
    return [transpose_rows(op, A.flatten(0, 1), in_shape).view(batch, rows, *in_shape)], bias


def _backward_relu(net: Network, index: int, op: Op, A: Tensor, bias: Tensor,
                   relaxations: Mapping[int, Relaxation]) -> tuple[list[Tensor], Tensor]:
    relaxation = relaxations[index]
    assert isinstance(relaxation, ReluRelaxation)
    A, bias = relu_step(A, bias, row_slopes(relaxation, A), relaxation.upper_slope,
                        relaxation.upper_intercept)
    if isinstance(relaxation, SplitReluRelaxation):
        A = A - relaxation.split_term
    return [A], bias


def row_slopes(relaxation: ReluRelaxation, A: Tensor) -> Tensor:
    """The lower slopes of ``relaxation`` for rows ``A: (B, K, *S)``: ``(B, 1, *S)`` from
    per-neuron slopes ``(B, *S)``, or per-row slopes ``(B, K, *S)`` as they are (alpha-CROWN's,
    see :func:`with_row_slopes`)."""
    slope = relaxation.lower_slope
    return slope if slope.dim() == A.dim() else slope.unsqueeze(1)


def with_row_slopes(relaxations: Mapping[int, Relaxation], slopes: Mapping[int, Tensor]
                    ) -> dict[int, Relaxation]:
    """``relaxations`` with the lower slopes of the ReLUs in ``slopes`` replaced by per-row
    slopes ``(B, K, *S)`` (kept where the neuron is stable)."""
    found = dict(relaxations)
    for index, slope in slopes.items():
        relaxation = relaxations[index]
        assert isinstance(relaxation, ReluRelaxation)
        chosen = torch.where(relaxation.unstable.unsqueeze(1), slope,
                             relaxation.lower_slope.unsqueeze(1))
        found[index] = ReluRelaxation(chosen, relaxation.upper_slope,
                                      relaxation.upper_intercept, relaxation.unstable)
    return found


def optimise_row_slopes(net: Network, A: Tensor, box: Box, relaxations: Mapping[int, Relaxation],
                        *, steps: int, lr: float, deadline: float | None = None
                        ) -> dict[int, Tensor]:
    """alpha-CROWN on a graph (Xu et al. 2021): per-row lower slopes ``(B, K, *S)`` of every
    ReLU maximising ``min A f`` over ``box`` (Adam, projected to ``[0, 1]``), the slopes of each
    row's best bound (detached). Stops early at ``deadline`` (``time.monotonic()``)."""
    A = A.detach()
    rows = A.shape[1]
    frozen = {i: _detached(r) for i, r in relaxations.items()}
    free = {i: r.lower_slope.unsqueeze(1).expand(r.lower_slope.shape[0], rows,
                                                 *r.lower_slope.shape[1:]).clone()
            for i, r in frozen.items() if isinstance(r, ReluRelaxation)}

    def bound_of(slopes: dict[int, Tensor]) -> Tensor:
        return input_bound(net, len(net.ops), A, box, with_row_slopes(frozen, slopes))

    return ascend_slopes(free, bound_of, steps=steps, lr=lr, deadline=deadline)


def _detached(relaxation: Relaxation) -> Relaxation:
    if isinstance(relaxation, ReluRelaxation):
        return ReluRelaxation(relaxation.lower_slope.detach(), relaxation.upper_slope.detach(),
                              relaxation.upper_intercept.detach(), relaxation.unstable)
    return relaxation


def _backward_add(net: Network, index: int, op: Op, A: Tensor, bias: Tensor,
                  relaxations: Mapping[int, Relaxation]) -> tuple[list[Tensor], Tensor]:
    return [A, A], bias


def _backward_concat(net: Network, index: int, op: Op, A: Tensor, bias: Tensor,
                     relaxations: Mapping[int, Relaxation]) -> tuple[list[Tensor], Tensor]:
    assert isinstance(op, Concat)
    sizes = [net.shapes[v][op.dim] for v in net.op_inputs[index]]
    return list(torch.split(A, sizes, dim=op.dim + 2)), bias


def _backward_max_pool(net: Network, index: int, op: Op, A: Tensor, bias: Tensor,
                       relaxations: Mapping[int, Relaxation]) -> tuple[list[Tensor], Tensor]:
    relaxation = relaxations[index]
    assert isinstance(relaxation, MaxPoolRelaxation)
    batch, rows, channels = A.shape[0], A.shape[1], A.shape[2]
    in_shape = net.in_shape(index)
    negative = A.clamp(max=0)
    exact = relaxation.exact.unsqueeze(1)
    # Positive coefficients take y >= x_j; negative ones y = x_j where exact, else y <= max u.
    through = torch.where(exact, A, A.clamp(min=0))
    bias = bias + features_dot(torch.where(exact, 0.0, negative), relaxation.upper)
    index_map = relaxation.chosen.unsqueeze(1).expand(batch, rows, channels, -1)
    A_in = A.new_zeros((batch, rows, channels, in_shape[1] * in_shape[2]))
    A_in = A_in.scatter_add(3, index_map, through.flatten(3))
    return [A_in.view(batch, rows, *in_shape)], bias


BACKWARD_RULES: dict[type, BackwardRule] = {
    Affine: _backward_affine,
    Relu: _backward_relu,
    Add: _backward_add,
    Concat: _backward_concat,
    MaxPool: _backward_max_pool,
}


def graph_backward(
    net: Network,
    value: int,
    A: Tensor,
    relaxations: Mapping[int, Relaxation],
    stop: int = 0,
    bias: Tensor | None = None,
    record: dict[int, tuple[Tensor, list[Tensor]]] | None = None,
) -> tuple[dict[int, Tensor], Tensor]:
    """Carry ``A z_value`` (``A: (B, K, *shapes[value])``) back through the ops before
    ``value`` from op ``value - 1`` down to op ``stop``.

    Returns the coefficients on every value the pass reached and did not pass further back
    (the input, for ``stop`` 0; values produced before op ``stop`` otherwise), and the
    constant ``(B, K)``: ``A z_value >= sum_v A_v z_v + bias`` wherever the relaxed ops' inputs
    lie in the boxes their relaxations were built on. ``record``, when given, receives per op
    passed the coefficients on its output and those it passed to each of its inputs (a
    ReLU's: the Lagrange multiplier on its pre-activation, as beta-CROWN's dual reads it).
    """
    inputs = net.op_inputs
    pending: dict[int, Tensor] = {value: A}
    if bias is None:
        bias = A.new_zeros(A.shape[:2])
    for index in range(value - 1, stop - 1, -1):
        coefficients = pending.pop(index + 1, None)
        if coefficients is None:
            continue
        op = net.ops[index]
        rule = rule_for(BACKWARD_RULES, op, "the backward (CROWN) pass")
        parts, bias = rule(net, index, op, coefficients, bias, relaxations)
        if record is not None:
            record[index] = (coefficients, parts)
        for source, part in zip(inputs[index], parts, strict=True):
            found = pending.get(source)
            pending[source] = part if found is None else found + part
    return pending, bias


def input_bound(net: Network, value: int, A: Tensor, box: Box,
                relaxations: Mapping[int, Relaxation], bias: Tensor | None = None) -> Tensor:
    """``min A z_value + bias`` over the input ``box``: ``(B, K)``.

    As the chain's :func:`~tightrope.bounds.backward.input_lower_bound`: leading affine ops
    that never mix coordinates and are their input's only reader carry the box forward
    (interval arithmetic is exact through them), and a first mixing op with a ``concretize``
    rule bounds its rows over its input box itself.
    """
    first, center, radius = _leading_box(net, value, box)
    op = net.ops[first] if first < value else None
    if isinstance(op, Affine) and op.concretize is not None and _sole_reader(net, first):
        pending, bias = graph_backward(net, value, A, relaxations, stop=first + 1, bias=bias)
        rows = pending.get(first + 1)
        if rows is None:
            return bias
        bias = bias + features_dot(rows, net.offset(first))
        return op.concretize(rows, center, radius) + bias
    pending, bias = graph_backward(net, value, A, relaxations, stop=first, bias=bias)
    coefficients = pending.get(first)
    if coefficients is None:
        return bias
    return features_dot(coefficients, center) - features_dot(coefficients.abs(), radius) + bias


def _sole_reader(net: Network, index: int) -> bool:
    """Whether op ``index`` reads value ``index`` and no other op does."""
    readers = [i for i, ins in enumerate(net.op_inputs) if index in ins]
    return readers == [index] and net.op_inputs[index] == (index,)


def _leading_box(net: Network, value: int, box: Box) -> tuple[int, Tensor, Tensor]:
    """The first op ``k`` that is not a non-mixing affine map of the chain from the input, and
    the box of value ``k`` (the input box carried through ops ``0..k-1``)."""
    center, radius = box.center, box.radius
    first = 0
    while first < value and _sole_reader(net, first):
        op = net.ops[first]
        if not isinstance(op, Affine) or op.mixing:
            break
        center, radius = op.apply(center), op.apply_abs(radius)
        first += 1
    return first, center, radius


#: Upper limit on the elements of one coefficient tensor ``(B, rows, *S)`` in the intermediate
#: passes; larger row sets go through in chunks.
ROW_CHUNK_ELEMENTS = 1 << 25


def graph_pre_activations(
    net: Network, box: Box, crown: bool, lower_slope: LowerSlope
) -> tuple[dict[int, Box], dict[int, Relaxation]]:
    """Bounds on the input of every relaxed op and their relaxations, keyed by op index: by IBP
    (``crown`` False) or by a CROWN pass per relaxed op over the neurons IBP leaves loose,
    intersected with IBP's."""
    boxes: dict[int, Box] = {}
    relaxations: dict[int, Relaxation] = {}
    if not crown:
        graph_interval(net, box, found=boxes)
        return boxes, box_relaxations(net, boxes, lower_slope)
    for index in nonlinear_indices(net):
        found: dict[int, Box] = {}
        graph_interval(net, box, end=index + 1, known=boxes, found=found)
        interval = found[index]
        value = net.op_inputs[index][0]
        if _linear_before(net, value):
            pre = interval
        else:
            pre = _tighten(net, value, box, interval, relaxations,
                           loose_only=isinstance(net.ops[index], Relu))
        boxes[index] = pre
        relaxations[index] = relaxation_of(net.ops[index], pre, lower_slope)
    return boxes, relaxations


def _linear_before(net: Network, value: int) -> bool:
    """Whether ``value`` is a chain of at most one mixing affine map of the input, where
    interval arithmetic is exact."""
    mixing = 0
    while value > 0:
        op = net.ops[value - 1]
        if not isinstance(op, Affine) or len(net.op_inputs[value - 1]) != 1:
            return False
        mixing += op.mixing
        value = net.op_inputs[value - 1][0]
    return mixing <= 1


def _tighten(net: Network, value: int, box: Box, interval: Box,
             relaxations: Mapping[int, Relaxation], loose_only: bool) -> Box:
    """CROWN bounds on the neurons of ``value`` (those the interval leaves unstable when
    ``loose_only``, else every one with a positive width), intersected with ``interval``."""
    lower = interval.lower.flatten(1)
    batch, shape = lower.shape[0], net.shapes[value]
    use_patches = patches.patchable(net, value, relaxations)

    def bound(neurons: Tensor) -> Tensor:
        if use_patches:
            return _patch_rows(net, value, neurons, box, relaxations, lower)
        rows = selector_rows(neurons, batch, shape, lower)
        return input_bound(net, value, torch.cat([rows, -rows], dim=1), box, relaxations)

    # Rows on receptive fields: a few times more of them fit a chunk.
    chunk = row_chunk(net, value, batch, ROW_CHUNK_ELEMENTS) * (8 if use_patches else 1)
    return tighten_neurons(interval, loose_only, chunk, bound)


def row_chunk(net: Network, value: int, batch: int, elements: int) -> int:
    """How many neurons of ``value`` one pass of ``[e_n; -e_n]`` rows may take so that no
    coefficient tensor on the way back exceeds ``elements``."""
    widest = max(_numel(s) for s in net.shapes[: value + 1])
    return max(1, elements // max(1, 2 * batch * widest))


def selector_rows(neurons: Tensor, batch: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """``(B, count, *shape)`` unit rows ``e_n`` for the flat ``neurons`` of a value."""
    count = neurons.numel()
    selector = like.new_zeros((batch, count, _numel(shape)))
    selector[:, torch.arange(count), neurons] = 1.0
    return selector.view(batch, count, *shape)


def tighten_neurons(interval: Box, loose_only: bool, chunk: int,
                    bound: Callable[[Tensor], Tensor]) -> Box:
    """``interval`` (``(B, *S)``) with its loose neurons (unstable ones when ``loose_only``,
    else every one of positive width) intersected with ``bound(neurons)``: ``(B, 2 count)``
    lower bounds of ``[e_n; -e_n]`` for flat ``neurons``, asked ``chunk`` neurons at a time.
    Only a sample's own loose neurons take new bounds, so that a sample's result does not
    depend on the rest of its batch."""
    lower, upper = interval.lower.flatten(1), interval.upper.flatten(1)
    wanted = (lower < 0) & (upper > 0) if loose_only else upper > lower
    union = wanted.any(dim=0).nonzero().squeeze(1)
    for begin in range(0, union.numel(), chunk):
        neurons = union[begin : begin + chunk]
        count = neurons.numel()
        found = bound(neurons)
        valid, old_lower, old_upper = wanted[:, neurons], lower[:, neurons], upper[:, neurons]
        new_lower = torch.where(valid, torch.maximum(old_lower, found[:, :count]), old_lower)
        new_upper = torch.where(valid, torch.minimum(old_upper, -found[:, count:]), old_upper)
        lower = lower.index_copy(1, neurons, new_lower)
        upper = upper.index_copy(1, neurons, new_upper)
    return Box(lower.view(interval.lower.shape), upper.view(interval.upper.shape))


def _patch_rows(net: Network, value: int, neurons: Tensor, box: Box,
                relaxations: Mapping[int, Relaxation], like: Tensor) -> Tensor:
    """``_tighten``'s rows ``[e_n; -e_n]`` for the flat ``neurons`` of image value ``value``,
    bounded by :func:`tightrope.bounds.patches.patch_bound`: ``(B, 2 count)``."""
    channels, height, width = net.shapes[value]
    count = neurons.numel()
    channel = torch.div(neurons, height * width, rounding_mode="floor")
    pixel = neurons % (height * width)
    corner = torch.stack([torch.div(pixel, width, rounding_mode="floor"), pixel % width], 1)
    rows = like.new_zeros((like.shape[0], count, channels, 1, 1))
    rows[:, torch.arange(count), channel, 0, 0] = 1.0
    return patches.patch_bound(net, value, torch.cat([rows, -rows], dim=1),
                               torch.cat([corner, corner]), box, relaxations)


def output_bounds(net: Network, box: Box, C: Tensor, relaxations: Mapping[int, Relaxation],
                  upper: bool) -> Box:
    """CROWN bounds of ``C f`` (``C: (B, K, *S_out)``) given the relaxations of every relaxed
    op; upper bounds ``+inf`` unless ``upper``."""
    rows = C.shape[1]
    end = len(net.ops)
    if not upper:
        bound = input_bound(net, end, C, box, relaxations)
        return Box(bound, torch.full_like(bound, float("inf")))
    found = input_bound(net, end, torch.cat([C, -C], dim=1), box, relaxations)
    return Box(found[:, :rows], -found[:, rows:])


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total
