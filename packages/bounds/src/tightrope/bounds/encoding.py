"""The linear and mixed-integer programs that the LP and MILP oracles solve.

One program per sample, over the variables (in this order)

* ``x``: the network input, ``n_0`` values, bounded by the input box;
* for every ReLU ``k``: its pre-activation ``z_k`` in ``[l_k, u_k]`` (the same pre-activation
  bounds ``crown`` uses) and its output ``y_k`` in ``[relu(l_k), relu(u_k)]``, ``n_k`` each;
* MILP only: one binary phase ``d`` per unstable neuron.

Constraints:

* ``z_k = W_k y_{k-1} + b_k`` (``y_0 = x``), where ``(W_k, b_k)`` is the affine chain of ops
  between two ReLUs, its matrix read off generically as the transpose of the chain applied to
  identity rows (a vector-Jacobian product), so every registered affine layer works;
* every neuron that is not inactive: ``y >= z`` and ``y <= s z + t``, with ``s = 1, t = 0``
  on active neurons (so ``y = z``) and the chord ``s = u / (u - l), t = -s l`` on unstable ones;
  with ``y >= 0`` this is the triangle relaxation of Wong & Kolter 2018 ("Provable Defenses
  against Adversarial Examples via the Convex Outer Adversarial Polytope"); inactive neurons
  are fixed at ``y = 0`` by their bounds;
* MILP: ``y <= u d`` and ``y <= z - l (1 - d)`` for every unstable neuron, which with the
  constraints above makes ``y = relu(z)`` exactly (Tjeng et al. 2019, "Evaluating Robustness of
  Neural Networks with Mixed Integer Programming").

The objective of row ``r`` is ``c_r . y_L + c0_r``: the specification folded into the affine
tail after the last ReLU. Everything is float64 on the CPU; this module needs torch only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from tightrope.bounds.backward import backward_lower
from tightrope.bounds.core import Box
from tightrope.bounds.linear import (
    Intermediate,
    PreActivations,
    _output_spec,
    _reshape_result,
    pre_activation_bounds,
)
from tightrope.bounds.network import Affine, Network
from tightrope.bounds.problem import Problem, prepare
from tightrope.bounds.relaxation import LowerSlope

__all__ = [
    "DEFAULT_MAX_VARIABLES",
    "Program",
    "RowSolver",
    "SparseMatrix",
    "check_size",
    "float64_problem",
    "load_scipy",
    "programs",
    "solve_rows",
]

#: Prepares one program for the solver and returns the function that solves its row ``r``,
#: returning a sound lower bound of that row's minimum (offset included).
RowSolver: TypeAlias = Callable[["Program"], Callable[[int], float]]

#: Default cap on the variables of one program (input + 2 per ReLU neuron, + 1 more per ReLU
#: neuron for the MILP). Past it, dense Jacobians and per-row solves stop being a test oracle.
DEFAULT_MAX_VARIABLES = 20_000

#: Elements of one dense chunk of a segment matrix read off by the backward pass.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True, slots=True)
class SparseMatrix:
    """A matrix in coordinate form: ``values[i]`` sits at ``(rows[i], cols[i])``."""

    rows: Tensor
    cols: Tensor
    values: Tensor
    shape: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Program:
    """``min objectives[r] . v + offsets[r]`` over ``A_eq v = b_eq``, ``A_ub v <= b_ub``,
    ``lower <= v <= upper`` and ``v[integer]`` integral; one sample, every objective row.

    ``objectives: (R, n)``, ``offsets: (R,)``, ``lower, upper, integer: (n,)``.
    """

    objectives: Tensor
    offsets: Tensor
    A_eq: SparseMatrix
    b_eq: Tensor
    A_ub: SparseMatrix
    b_ub: Tensor
    lower: Tensor
    upper: Tensor
    integer: Tensor


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def check_size(net: Network, *, binaries: bool, max_variables: int, caller: str) -> None:
    """Refuse a network whose program would exceed ``max_variables`` variables."""
    if max_variables < 1:
        raise ValueError(f"max_variables must be positive, got {max_variables}")
    n_input = _numel(net.input_shape)
    neurons = sum(_numel(net.in_shape(i)) for i in net.relu_indices)
    variables = n_input + (3 if binaries else 2) * neurons
    if not net.is_relu_chain:  # a graph program: every value, and phases per relaxed input
        relaxed = sum(_numel(net.in_shape(i)) for i, op in enumerate(net.ops)
                      if not isinstance(op, Affine))
        variables = sum(_numel(s) for s in net.shapes) + (relaxed if binaries else 0)
    if variables > max_variables:
        raise ValueError(
            f"{caller}: this network needs up to {variables} variables ({n_input} inputs, "
            f"{neurons} ReLU neurons), more than max_variables={max_variables}. The LP/MILP "
            "oracles are for small networks; use crown or alpha_crown, or raise max_variables "
            "if you really mean to solve a program this large."
        )


def float64_problem(model: nn.Module, box: Box, C: Tensor | None) -> Problem:
    """The problem lowered in float64 on the CPU (a converted copy of the model if needed)."""
    cpu, f64 = torch.device("cpu"), torch.float64
    if box.lower.dtype == f64 and box.lower.device.type == "cpu":
        return prepare(model, box, C)
    model64 = copy.deepcopy(model).to(device=cpu, dtype=f64)
    box64 = Box(box.lower.to(device=cpu, dtype=f64), box.upper.to(device=cpu, dtype=f64))
    return prepare(model64, box64, None if C is None else C.to(device=cpu, dtype=f64))


def _segment(net: Network, start: int, end: int) -> tuple[SparseMatrix, Tensor]:
    """``(W, b)`` of the affine ops ``[start, end)``: ``out = W in + b`` on flat vectors.

    Rows of ``W`` come from the backward pass on identity rows, in chunks.
    """
    n_out, n_in = _numel(net.shapes[end]), _numel(net.shapes[start])
    chunk = max(1, _CHUNK_ELEMENTS // max(n_in, n_out))
    rows, cols, values, biases = [], [], [], []
    for begin in range(0, n_out, chunk):
        count = min(chunk, n_out - begin)
        eye = torch.zeros((1, count, n_out), dtype=torch.float64)
        eye[0, torch.arange(count), torch.arange(begin, begin + count)] = 1.0
        rows_out = eye.view(1, count, *net.shapes[end])
        dense, bias = backward_lower(net, end, rows_out, {}, start=start)
        dense = dense.reshape(count, n_in)
        found = dense.nonzero()
        rows.append(found[:, 0] + begin)
        cols.append(found[:, 1])
        values.append(dense[found[:, 0], found[:, 1]])
        biases.append(bias.reshape(count))
    matrix = SparseMatrix(torch.cat(rows), torch.cat(cols), torch.cat(values), (n_out, n_in))
    return matrix, torch.cat(biases)


def programs(
    problem: Problem, pre: PreActivations, *, binaries: bool, upper: bool
) -> Iterator[Program]:
    """The program of every sample of ``problem`` (float64, CPU), in batch order.

    Args:
        problem: the float64 CPU problem (see :func:`float64_problem`).
        pre: pre-activation bounds of every ReLU op, in any dtype/device (cast to float64).
        binaries: add the MILP phase variables.
        upper: objective rows ``[C; -C]`` (lower and upper bounds) instead of ``C``.
    """
    net = problem.net
    net.require_chain("the LP/MILP encoding")
    relus = net.relu_indices
    sizes = [_numel(net.shapes[i]) for i in relus]
    n_input = _numel(net.input_shape)
    # Variable offsets: z_k starts at z_start[k], y_k right after it.
    z_start = [n_input + 2 * sum(sizes[:k]) for k in range(len(relus))]
    n_continuous = n_input + 2 * sum(sizes)

    # Equalities z_k - W_k y_{k-1} = b_k, shared by every sample.
    equalities = _Rows()
    previous_start, previous_op = 0, 0  # where y_{k-1} (x for k = 0) starts; op after it
    for k, index in enumerate(relus):
        matrix, bias = _segment(net, previous_op, index)
        z = torch.arange(sizes[k]) + z_start[k]
        equalities.add(
            [(z, torch.ones(sizes[k], dtype=torch.float64))],
            bias,
            extra=(matrix.rows, matrix.cols + previous_start, -matrix.values),
        )
        previous_start, previous_op = z_start[k] + sizes[k], index + 1

    # The specification folded into the affine tail: objective coefficients on y_L (or x).
    spec = _output_spec(problem)
    if upper:
        spec = torch.cat([spec, -spec], dim=1)
    tail, tail_bias = backward_lower(net, len(net.ops), spec, {}, start=previous_op)
    tail = tail.flatten(2)
    last = z_start[-1] + sizes[-1] if relus else 0

    def cpu64(t: Tensor, sample: int) -> Tensor:
        return t[sample].flatten().to("cpu", torch.float64)

    for sample in range(problem.batch):
        lower_parts = [cpu64(problem.box.lower, sample)]
        upper_parts = [cpu64(problem.box.upper, sample)]
        inequalities = _Rows()
        phase = n_continuous  # index of the next binary variable
        for k, index in enumerate(relus):
            relaxation = pre.relaxations[index]
            lo, hi = cpu64(pre.boxes[index].lower, sample), cpu64(pre.boxes[index].upper, sample)
            slope = cpu64(relaxation.upper_slope, sample)
            intercept = cpu64(relaxation.upper_intercept, sample)
            lower_parts += [lo, lo.clamp(min=0)]
            upper_parts += [hi, hi.clamp(min=0)]
            z = torch.arange(sizes[k]) + z_start[k]
            y = z + sizes[k]
            live = (hi > 0).nonzero().flatten()  # active or unstable; inactive: y in [0, 0]
            one = torch.ones(live.numel(), dtype=torch.float64)
            inequalities.add([(z[live], one), (y[live], -one)], torch.zeros_like(one))  # z <= y
            inequalities.add([(y[live], one), (z[live], -slope[live])], intercept[live])  # chord
            if binaries:
                which = relaxation.unstable[sample].flatten().cpu().nonzero().flatten()
                d = torch.arange(which.numel()) + phase
                phase += int(which.numel())
                ones = torch.ones(which.numel(), dtype=torch.float64)
                # y <= u d  and  y <= z - l (1 - d)
                inequalities.add([(y[which], ones), (d, -hi[which])], torch.zeros_like(ones))
                inequalities.add(
                    [(y[which], ones), (z[which], -ones), (d, -lo[which])], -lo[which]
                )
        n_variables = phase
        lower_parts.append(torch.zeros(n_variables - n_continuous, dtype=torch.float64))
        upper_parts.append(torch.ones(n_variables - n_continuous, dtype=torch.float64))
        integer = torch.zeros(n_variables, dtype=torch.bool)
        integer[n_continuous:] = True
        objectives = torch.zeros((tail.shape[1], n_variables), dtype=torch.float64)
        objectives[:, last : last + tail.shape[2]] = tail[sample]
        A_eq, b_eq = equalities.build(n_variables)
        A_ub, b_ub = inequalities.build(n_variables)
        yield Program(
            objectives=objectives,
            offsets=tail_bias[sample],
            A_eq=A_eq,
            b_eq=b_eq,
            A_ub=A_ub,
            b_ub=b_ub,
            lower=torch.cat(lower_parts),
            upper=torch.cat(upper_parts),
            integer=integer,
        )


def _graph_programs(problem: Problem, exact: Problem, intermediate: Intermediate,
                    lower_slope: LowerSlope, binaries: bool, upper: bool) -> Iterator[Program]:
    """:func:`programs` of a graph network (:mod:`tightrope.bounds.graph_encoding`)."""
    from tightrope.bounds.graph import graph_pre_activations
    from tightrope.bounds.graph_encoding import graph_programs

    boxes, relaxations = graph_pre_activations(problem.net, problem.box,
                                               intermediate is Intermediate.CROWN, lower_slope)
    return graph_programs(exact.net, exact.box, _output_spec(exact), boxes, relaxations,
                          binaries=binaries, upper=upper)


class _Rows:
    """Accumulates blocks of constraint rows ``sum_j values_j * v[columns_j] (=|<=) rhs``."""

    def __init__(self) -> None:
        self.rows: list[Tensor] = []
        self.cols: list[Tensor] = []
        self.values: list[Tensor] = []
        self.rhs: list[Tensor] = []
        self.count = 0

    def add(
        self,
        terms: list[tuple[Tensor, Tensor]],
        rhs: Tensor,
        extra: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> None:
        """Rows ``i = 0..len(rhs)-1`` of the block: term ``(columns, values)`` puts
        ``values[i]`` at column ``columns[i]`` of row ``i``; ``extra`` holds further
        ``(row_in_block, column, value)`` triplets."""
        lines = torch.arange(rhs.numel()) + self.count
        for columns, values in terms:
            self.rows.append(lines)
            self.cols.append(columns)
            self.values.append(values)
        if extra is not None:
            self.rows.append(extra[0] + self.count)
            self.cols.append(extra[1])
            self.values.append(extra[2])
        self.rhs.append(rhs)
        self.count += rhs.numel()

    def build(self, n_variables: int) -> tuple[SparseMatrix, Tensor]:
        matrix = SparseMatrix(
            _cat_long(self.rows), _cat_long(self.cols), _cat_float(self.values),
            (self.count, n_variables),
        )
        return matrix, _cat_float(self.rhs)


def _cat_long(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _cat_float(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def load_scipy(caller: str) -> ModuleType:
    """``scipy.optimize``, or an ImportError that says how to install it."""
    try:
        import scipy.optimize
    except ImportError as error:
        raise ImportError(
            f"{caller} solves with SciPy's HiGHS, which is not installed; "
            "pip install tightrope-bounds[oracles]"
        ) from error
    optimize: ModuleType = scipy.optimize
    return optimize


def to_scipy(matrix: SparseMatrix) -> Any:
    """The matrix as a ``scipy.sparse.csr_array``."""
    import scipy.sparse

    return scipy.sparse.coo_array(
        (matrix.values.numpy(), (matrix.rows.numpy(), matrix.cols.numpy())), shape=matrix.shape
    ).tocsr()


def solve_rows(
    model: nn.Module,
    box: Box,
    C: Tensor | None,
    *,
    intermediate: Intermediate,
    lower_slope: LowerSlope,
    upper: bool,
    binaries: bool,
    max_variables: int,
    caller: str,
    solve: RowSolver,
) -> Box:
    """Bounds on ``C f`` from one solve per (sample, spec row, side); see ``lp_bound``."""
    load_scipy(caller)
    with torch.no_grad():
        problem = prepare(model, box, C)
        check_size(problem.net, binaries=binaries, max_variables=max_variables, caller=caller)
        on_cpu64 = box.lower.dtype == torch.float64 and box.lower.device.type == "cpu"
        exact = problem if on_cpu64 else float64_problem(model, box, C)
        rows = _output_spec(problem).shape[1]
        found = torch.empty((problem.batch, 2 * rows if upper else rows), dtype=torch.float64)
        # Pre-activation bounds exactly as crown computes them (model dtype and device).
        if problem.net.is_relu_chain:
            pre = pre_activation_bounds(problem.net, box, intermediate, lower_slope)
            made = programs(exact, pre, binaries=binaries, upper=upper)
        else:
            made = _graph_programs(problem, exact, intermediate, lower_slope, binaries, upper)
        for sample, program in enumerate(made):
            solve_row = solve(program)
            for row in range(found.shape[1]):
                found[sample, row] = solve_row(row)
        found = found.to(dtype=box.lower.dtype, device=box.lower.device)
        if upper:
            bounds = Box(found[:, :rows], -found[:, rows:])
        else:
            bounds = Box(found, torch.full_like(found, float("inf")))
        return _reshape_result(problem, bounds)
