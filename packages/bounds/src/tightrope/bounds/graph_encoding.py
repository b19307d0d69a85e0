"""The LP and MILP programs of a graph network: one rule per op kind (``ENCODING_RULES``).

The chain encoding (:mod:`.encoding`) keeps variables at ReLUs only; on a graph every value
``v`` gets its own block of variables ``z_v`` (value 0 is the input, bounded by the box;
the inputs of relaxed ops by their pre-activation boxes; the rest free), and each op adds the
constraints that tie its output to its inputs:

* ``Affine``: ``z_out = W z_in + b``, ``W`` read off as the transpose of the map applied to
  identity rows (any registered affine layer works);
* ``Add``: ``z_out = z_a + z_b``; ``Concat``: each part of ``z_out`` equals its input;
* ``Relu``: the triangle relaxation on ``[l, u]`` (Wong & Kolter 2018), and with binaries
  ``y <= u d``, ``y <= z - l (1 - d)`` per unstable neuron (Tjeng et al. 2019): exact;
* ``MaxPool``: ``y >= x_i`` for every input of the window, ``y <= max_i u_i``, and ``y = x_j``
  where one input dominates (``l_j >= u_i`` for the others); with binaries one phase ``a_i``
  per input, ``sum_i a_i = 1`` and ``y <= x_i + (max u - l_i)(1 - a_i)`` (Tjeng et al. 2019):
  exact.

The objective rows are the specification on the output value. Float64 on the CPU, for the
oracles (:func:`tightrope.bounds.lp_bound`, :func:`tightrope.bounds.milp_bound`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor

from tightrope.bounds.core import Box
from tightrope.bounds.encoding import Program, SparseMatrix, _numel, _Rows
from tightrope.bounds.graph import (
    MaxPoolRelaxation,
    Relaxation,
    graph_interval,
    max_pool_relaxation,
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

__all__ = ["ENCODING_RULES", "graph_programs", "graph_variables"]

#: Elements of one dense chunk of an affine op's matrix read off by the transpose.
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class _Program:
    """One sample's program under construction."""

    net: Network
    starts: list[int]
    boxes: Mapping[int, Box]
    relaxations: Mapping[int, Relaxation]
    sample: int
    binaries: bool
    count: int
    equalities: _Rows = field(default_factory=_Rows)
    inequalities: _Rows = field(default_factory=_Rows)
    lower: dict[int, Tensor] = field(default_factory=dict)
    upper: dict[int, Tensor] = field(default_factory=dict)
    phases: list[int] = field(default_factory=list)

    def variables(self, value: int) -> Tensor:
        return torch.arange(_numel(self.net.shapes[value])) + self.starts[value]

    def new_phases(self, count: int) -> Tensor:
        found = torch.arange(count) + self.count
        self.phases.append(count)
        self.count += count
        return found

    def box(self, index: int) -> tuple[Tensor, Tensor]:
        box = self.boxes[index]
        return (box.lower[self.sample].flatten().to("cpu", torch.float64),
                box.upper[self.sample].flatten().to("cpu", torch.float64))


def _affine_matrix(net: Network, index: int) -> tuple[SparseMatrix, Tensor]:
    """``(W, b)`` of affine op ``index`` on flat vectors, from its transpose on identity rows."""
    op = net.ops[index]
    assert isinstance(op, Affine)
    in_shape, out_shape = net.in_shape(index), net.shapes[index + 1]
    n_in, n_out = _numel(in_shape), _numel(out_shape)
    chunk = max(1, _CHUNK_ELEMENTS // max(n_in, n_out))
    rows, cols, values = [], [], []
    for begin in range(0, n_out, chunk):
        count = min(chunk, n_out - begin)
        eye = torch.zeros((count, n_out), dtype=torch.float64)
        eye[torch.arange(count), torch.arange(begin, begin + count)] = 1.0
        dense = transpose_rows(op, eye.view(count, *out_shape), in_shape).reshape(count, n_in)
        found = dense.nonzero()
        rows.append(found[:, 0] + begin)
        cols.append(found[:, 1])
        values.append(dense[found[:, 0], found[:, 1]])
    matrix = SparseMatrix(torch.cat(rows), torch.cat(cols), torch.cat(values), (n_out, n_in))
    return matrix, net.offset(index).flatten().to(torch.float64)


def _encode_affine(state: _Program, index: int, op: Op) -> None:
    net = state.net
    matrix, bias = _affine_matrix(net, index)
    out = state.variables(index + 1)
    source = state.starts[net.op_inputs[index][0]]
    state.equalities.add([(out, torch.ones(out.numel(), dtype=torch.float64))], bias,
                         extra=(matrix.rows, matrix.cols + source, -matrix.values))


def _encode_add(state: _Program, index: int, op: Op) -> None:
    out = state.variables(index + 1)
    ones = torch.ones(out.numel(), dtype=torch.float64)
    first, second = (state.variables(v) for v in state.net.op_inputs[index])
    state.equalities.add([(out, ones), (first, -ones), (second, -ones)], torch.zeros_like(ones))


def _encode_concat(state: _Program, index: int, op: Op) -> None:
    assert isinstance(op, Concat)
    net = state.net
    out = state.variables(index + 1).view(net.shapes[index + 1])
    sizes = [net.shapes[v][op.dim] for v in net.op_inputs[index]]
    for part, value in zip(torch.split(out, sizes, dim=op.dim), net.op_inputs[index],
                           strict=True):
        ones = torch.ones(part.numel(), dtype=torch.float64)
        state.equalities.add([(part.flatten(), ones), (state.variables(value), -ones)],
                             torch.zeros_like(ones))


def _encode_relu(state: _Program, index: int, op: Op) -> None:
    relaxation = state.relaxations[index]
    assert isinstance(relaxation, ReluRelaxation)
    lo, hi = state.box(index)
    sample = state.sample
    slope = relaxation.upper_slope[sample].flatten().to("cpu", torch.float64)
    intercept = relaxation.upper_intercept[sample].flatten().to("cpu", torch.float64)
    z, y = state.variables(state.net.op_inputs[index][0]), state.variables(index + 1)
    state.lower[index + 1], state.upper[index + 1] = lo.clamp(min=0), hi.clamp(min=0)
    live = (hi > 0).nonzero().flatten()  # active or unstable; inactive: y in [0, 0]
    one = torch.ones(live.numel(), dtype=torch.float64)
    state.inequalities.add([(z[live], one), (y[live], -one)], torch.zeros_like(one))
    state.inequalities.add([(y[live], one), (z[live], -slope[live])], intercept[live])
    if state.binaries:
        which = ((lo < 0) & (hi > 0)).nonzero().flatten()
        d = state.new_phases(which.numel())
        ones = torch.ones(which.numel(), dtype=torch.float64)
        state.inequalities.add([(y[which], ones), (d, -hi[which])], torch.zeros_like(ones))
        state.inequalities.add([(y[which], ones), (z[which], -ones), (d, -lo[which])],
                               -lo[which])


def _encode_max_pool(state: _Program, index: int, op: Op) -> None:
    assert isinstance(op, MaxPool)
    net, sample = state.net, state.sample
    box = state.boxes[index]
    pre = Box(box.lower[sample : sample + 1].to("cpu", torch.float64),
              box.upper[sample : sample + 1].to("cpu", torch.float64))
    relaxation: MaxPoolRelaxation = max_pool_relaxation(op, pre)
    in_shape = net.in_shape(index)
    positions = _window_positions(op, in_shape)  # (C, L, k), -1 for padding
    x, y = state.variables(net.op_inputs[index][0]), state.variables(index + 1)
    lo, top = pre.lower.flatten(), relaxation.upper.flatten()
    state.lower[index + 1], state.upper[index + 1] = op.apply(pre.lower).flatten(), top
    channels, outputs_per_channel = positions.shape[0], positions.shape[1]
    outputs = torch.arange(y.numel()).view(channels, outputs_per_channel, 1)
    valid = positions >= 0
    inputs, owners = positions[valid], outputs.expand(positions.shape)[valid]
    ones = torch.ones(inputs.numel(), dtype=torch.float64)
    # y >= x_i for every input of the window.
    state.inequalities.add([(x[inputs], ones), (y[owners], -ones)], torch.zeros_like(ones))
    # y <= x_j where input j dominates its window.
    plane = in_shape[1] * in_shape[2]
    chosen = (relaxation.chosen[0] + torch.arange(channels).view(-1, 1) * plane).flatten()
    exact = relaxation.exact[0].flatten().nonzero().flatten()
    one = torch.ones(exact.numel(), dtype=torch.float64)
    state.inequalities.add([(y[exact], one), (x[chosen[exact]], -one)], torch.zeros_like(one))
    if state.binaries:
        phases = state.new_phases(inputs.numel())
        # y - x_i + (U - l_i) a_i <= U - l_i, and the phases of a window sum to 1.
        slack = top[owners] - lo[inputs]
        state.inequalities.add([(y[owners], ones), (x[inputs], -ones), (phases, slack)], slack)
        _sum_rows(state, owners, phases, y.numel())


def _sum_rows(state: _Program, rows: Tensor, phases: Tensor, count: int) -> None:
    """Equalities ``sum of the phases of output r = 1`` for every output ``r``."""
    base = state.equalities.count
    state.equalities.rows.append(rows + base)
    state.equalities.cols.append(phases)
    state.equalities.values.append(torch.ones(phases.numel(), dtype=torch.float64))
    state.equalities.rhs.append(torch.ones(count, dtype=torch.float64))
    state.equalities.count += count


def _window_positions(op: MaxPool, in_shape: tuple[int, ...]) -> Tensor:
    """``(C, L, k)`` flat input indices (over the whole value) of every pooling window, ``-1``
    where the window covers padding."""
    channels, height, width = in_shape
    index = torch.arange(channels * height * width, dtype=torch.float64).view(
        1, channels, height, width) + 1  # 0 marks padding
    (kh, kw), (sh, sw), (ph, pw) = op.kernel, op.stride, op.padding
    padded = F.pad(index, (pw, pw, ph, ph))
    windows = F.unfold(padded.view(channels, 1, *padded.shape[2:]), (kh, kw), stride=(sh, sw))
    return windows.transpose(1, 2).round().long() - 1  # (C, L, k)


EncodingRule: TypeAlias = Callable[[_Program, int, Op], None]
ENCODING_RULES: dict[type, EncodingRule] = {
    Affine: _encode_affine,
    Relu: _encode_relu,
    Add: _encode_add,
    Concat: _encode_concat,
    MaxPool: _encode_max_pool,
}


def graph_variables(net: Network) -> int:
    """The continuous variables of a graph program: every value's elements."""
    return sum(_numel(shape) for shape in net.shapes)


def graph_programs(
    net: Network, box: Box, spec: Tensor, boxes: Mapping[int, Box],
    relaxations: Mapping[int, Relaxation], *, binaries: bool, upper: bool,
) -> Iterator[Program]:
    """The program of every sample (float64, CPU): ``spec: (B, K, *S_out)`` objective rows
    (``[spec; -spec]`` with ``upper``), ``boxes``/``relaxations`` of every relaxed op."""
    starts = [0]
    for shape in net.shapes[:-1]:
        starts.append(starts[-1] + _numel(shape))
    n_continuous = graph_variables(net)
    rows = torch.cat([spec, -spec], dim=1) if upper else spec
    rows = rows.flatten(2).to("cpu", torch.float64)
    # Every variable is bounded (the solvers' dual bound needs finite bounds): by interval
    # arithmetic from the relaxed ops' boxes.
    known = {i: Box(b.lower.to(box.lower), b.upper.to(box.lower)) for i, b in boxes.items()}
    intervals = graph_interval(net, box, known=known, keep=True)
    for sample in range(box.lower.shape[0]):
        state = _Program(net, starts, boxes, relaxations, sample, binaries, n_continuous)
        for index, op in enumerate(net.ops):
            rule_for(ENCODING_RULES, op, "the LP/MILP encoding")(state, index, op)
        for value, interval in enumerate(intervals):
            assert interval is not None
            center, radius = interval[0][sample].flatten(), interval[1][sample].flatten()
            state.lower.setdefault(value, center - radius)
            state.upper.setdefault(value, center + radius)
        yield _finish(state, box, rows[sample], n_continuous)


def _finish(state: _Program, box: Box, objective_rows: Tensor, n_continuous: int) -> Program:
    net, sample = state.net, state.sample
    lower = torch.full((state.count,), float("-inf"), dtype=torch.float64)
    upper = torch.full((state.count,), float("inf"), dtype=torch.float64)
    n_input = _numel(net.shapes[0])
    lower[:n_input] = box.lower[sample].flatten().to("cpu", torch.float64)
    upper[:n_input] = box.upper[sample].flatten().to("cpu", torch.float64)
    for index in state.boxes:  # relaxed ops' inputs
        value = net.op_inputs[index][0]
        lo, hi = state.box(index)
        span = slice(state.starts[value], state.starts[value] + lo.numel())
        lower[span], upper[span] = torch.maximum(lower[span], lo), torch.minimum(upper[span], hi)
    for value, lo in state.lower.items():
        span = slice(state.starts[value], state.starts[value] + lo.numel())
        lower[span] = torch.maximum(lower[span], lo)
        upper[span] = torch.minimum(upper[span], state.upper[value])
    lower[n_continuous:], upper[n_continuous:] = 0.0, 1.0
    integer = torch.zeros(state.count, dtype=torch.bool)
    integer[n_continuous:] = True
    objectives = torch.zeros((objective_rows.shape[0], state.count), dtype=torch.float64)
    last = state.starts[len(net.ops)]
    objectives[:, last : last + objective_rows.shape[1]] = objective_rows
    A_eq, b_eq = state.equalities.build(state.count)
    A_ub, b_ub = state.inequalities.build(state.count)
    return Program(objectives, torch.zeros(objective_rows.shape[0], dtype=torch.float64),
                   A_eq, b_eq, A_ub, b_ub, lower, upper, integer)
