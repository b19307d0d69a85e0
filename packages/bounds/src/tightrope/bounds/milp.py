"""The MILP oracle: the exact worst case of a small ReLU network.

Tjeng et al. 2019 ("Evaluating Robustness of Neural Networks with Mixed Integer Programming")
encode every unstable ReLU ``y = relu(z)``, ``z`` in ``[l, u]``, exactly with one binary phase
``d``: ``y >= 0, y >= z, y <= u d, y <= z - l (1 - d)``; stable neurons are linear. With sound
pre-activation bounds the optimum is the true minimum of ``C f`` over the box (whatever bounds
are used; tighter ones only make the solve faster). We use ``crown``'s bounds, so the LP
relaxation of this program is exactly ``lp_bound``'s LP and ``milp >= lp`` holds row by row.
Solved with SciPy's HiGHS, one MILP per (sample, specification row, side).
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tightrope.bounds.core import Box
from tightrope.bounds.encoding import (
    DEFAULT_MAX_VARIABLES,
    Program,
    SparseMatrix,
    check_size,
    float64_problem,
    load_scipy,
    programs,
    solve_rows,
    to_scipy,
)
from tightrope.bounds.linear import (
    Intermediate,
    PreActivations,
    _output_spec,
    pre_activation_bounds,
)
from tightrope.bounds.network import Network
from tightrope.bounds.problem import Problem, prepare
from tightrope.bounds.relaxation import LowerSlope, relu_relaxation
from tightrope.bounds.rounding import rounding

__all__ = [
    "MilpMinimum",
    "MilpSearch",
    "MilpStatus",
    "milp_bound",
    "milp_fits",
    "milp_minimum",
    "milp_search",
]

#: Relative gap at which HiGHS may stop; the bound returned is the dual bound either way.
MIP_RELATIVE_GAP = 1e-9


def milp_bound(
    model: nn.Module,
    box: Box,
    C: Tensor | None = None,
    *,
    intermediate: Intermediate = Intermediate.CROWN,
    lower_slope: LowerSlope = LowerSlope.ADAPTIVE,
    upper: bool = True,
    time_limit: float | None = None,
    max_variables: int = DEFAULT_MAX_VARIABLES,
) -> Box:
    """Exact bounds on ``C f(x)`` over ``box`` by mixed-integer programming (Tjeng et al. 2019).

    Each bound is HiGHS's *dual* bound of its MILP, which is sound whether or not the search
    finished: equal to the true worst case (up to the solver's gap, ``MIP_RELATIVE_GAP`` and an
    absolute 1e-6) when solved, and the best proven bound when ``time_limit`` stopped it first
    (``-inf`` for a lower bound, ``+inf`` for an upper bound if not even the root LP finished).
    Built and solved in float64 on the CPU; not differentiable. Needs SciPy
    (``pip install tightrope-bounds[oracles]``).

    Args:
        model: any supported model, a chain or a graph (see :func:`tightrope.bounds.lower`).
        box: input box ``(B, *S_in)``.
        C: ``(B, K, n_out)`` or ``(K, n_out)`` specification; ``None`` bounds ``f`` itself.
        intermediate: pre-activation bounds (the big-M constants) by ``Intermediate.CROWN``
            or ``Intermediate.IBP``.
        lower_slope: lower-slope policy used for the CROWN intermediate bounds.
        upper: compute upper bounds too (else they are ``+inf``; half the solves).
        time_limit: seconds allowed per MILP (one per sample, row and side); None: no limit.
        max_variables: refuse (``ValueError``) networks whose MILP could have more variables
            (inputs + 3 per ReLU neuron).

    Returns:
        Box ``(B, K)``, or ``(B, *S_out)`` when ``C`` is None, in the box's dtype and device.

    Raises:
        RuntimeError: when HiGHS reports the MILP infeasible, unbounded or failed.
    """
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be positive seconds or None, got {time_limit}")

    def solver(program: Program) -> Callable[[int], float]:
        return _milp_solver(program, time_limit)

    return solve_rows(
        model, box, C, intermediate=intermediate, lower_slope=lower_slope, upper=upper,
        binaries=True, max_variables=max_variables, caller="milp_bound", solve=solver,
    )


def milp_fits(net: Network, max_variables: int = DEFAULT_MAX_VARIABLES) -> bool:
    """Whether the MILP of the lowered network ``net`` (inputs + 3 variables per ReLU neuron)
    stays within ``max_variables``: the size rule of :func:`milp_minimum` and
    :func:`milp_search`, which refuse larger networks with ``ValueError``."""
    if max_variables < 1:
        raise ValueError(f"max_variables must be positive, got {max_variables}")
    try:
        check_size(net, binaries=True, max_variables=max_variables, caller="milp_fits")
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class MilpMinimum:
    """The MILP's answer per specification row of one sample.

    Attributes:
        bound: ``(K,)`` the solver's proven lower bound of the row's minimum (``-inf`` when
            the program's numbers leave :data:`TRUSTED_RANGE`).
        value: ``(K,)`` the best value found (``inf`` when no feasible point was found).
        minimiser: ``(K, *S_in)`` the input attaining ``value`` (NaN where none was found).
        solved: ``(K,)`` whether the search finished (then ``bound`` ~ ``value``).
    """

    bound: Tensor
    value: Tensor
    minimiser: Tensor
    solved: Tensor


def milp_minimum(
    model: nn.Module,
    box: Box,
    C: Tensor,
    *,
    time_limit: float | None = None,
    max_variables: int = DEFAULT_MAX_VARIABLES,
) -> MilpMinimum:
    """Minimise every row of ``C f(x)`` over ``box`` exactly (Tjeng et al. 2019), with minimisers.

    Same program as :func:`milp_bound` (lower side only) for one sample; besides the proven
    bound it returns the solver's best input, which a verifier re-checks as a counterexample.
    Float64 on the CPU; needs SciPy.

    Args:
        box: input box ``(1, *S_in)``.
        C: ``(1, K, n_out)`` or ``(K, n_out)`` specification.
        time_limit: seconds per row (``None``: no limit).
    """
    program = _one_sample_program(model, box, C, None, max_variables, "milp_minimum")
    run = _milp_runner(program, time_limit)
    n_input = int(box.lower[0].numel())
    rows = program.objectives.shape[0]
    reliable = trusted(program)
    bound = torch.empty(rows, dtype=torch.float64)
    value = torch.full((rows,), math.inf, dtype=torch.float64)
    minimiser = torch.full((rows, n_input), math.nan, dtype=torch.float64)
    solved = torch.zeros(rows, dtype=torch.bool)
    for row in range(rows):
        try:
            result = run(row)
        except RuntimeError:
            if reliable:
                raise
            bound[row] = -math.inf  # HiGHS failed on numbers outside its range: no bound
            continue
        offset = float(program.offsets[row])
        dual = getattr(result, "mip_dual_bound", None)
        if dual is None or math.isnan(dual):
            dual = result.fun if result.status == 0 else -math.inf
        bound[row] = float(dual) + offset if reliable else -math.inf
        solved[row] = result.status == 0 and reliable
        if result.x is not None:
            value[row] = float(result.fun) + offset
            minimiser[row] = torch.as_tensor(result.x[:n_input], dtype=torch.float64)
    return MilpMinimum(bound, value, minimiser.view(rows, *box.lower.shape[1:]), solved)


#: Nonzero magnitudes within which HiGHS's answers are trusted as proofs. Its tolerances are
#: absolute (primal and dual feasibility 1e-7, MIP feasibility 1e-6) on a scaled program; with
#: coefficients, bounds or right-hand sides far above this range (a big-M of 1e24) scaling
#: cannot keep the rounding of its LP solves below them, and it has reported "infeasible" (or
#: "unbounded") for a feasible program. Below 1e-9 it drops matrix entries silently
#: (``small_matrix_value``), solving another program than ours. Outside the range no
#: infeasibility or bound is read from it.
TRUSTED_RANGE = (1e-9, 1e6)


def trusted(program: Program, *extra: Tensor) -> bool:
    """Whether every finite nonzero number of ``program`` (and of ``extra``) lies within
    :data:`TRUSTED_RANGE` in absolute value, and none is NaN."""
    low, high = TRUSTED_RANGE
    parts = [program.objectives.flatten(), program.offsets, program.A_eq.values, program.b_eq,
             program.A_ub.values, program.b_ub, program.lower, program.upper,
             *(t.flatten().to(torch.float64) for t in extra)]
    for part in parts:
        if bool(torch.isnan(part).any()):
            return False
        size = part[torch.isfinite(part) & (part != 0)].abs()
        if size.numel() and (float(size.min()) < low or float(size.max()) > high):
            return False
    return True


def _one_sample_program(
    model: nn.Module, box: Box, C: Tensor, boxes: dict[int, Box] | None, max_variables: int,
    caller: str,
) -> Program:
    """The float64 MILP of one sample (``box: (1, *S_in)``) over the pre-activation ``boxes``
    given per ReLU op index, or CROWN's when ``None`` (or keyed differently)."""
    if box.lower.shape[0] != 1:
        raise ValueError(f"{caller} takes one sample (box batch 1), got {tuple(box.shape)}")
    load_scipy(caller)
    with torch.no_grad():
        problem = prepare(model, box, C)
        check_size(problem.net, binaries=True, max_variables=max_variables, caller=caller)
        if not problem.net.is_relu_chain:
            return _graph_sample_program(model, problem, box, C, boxes)
        if boxes is None or set(boxes) != set(problem.net.relu_indices):
            # CROWN's boxes, widened by their rounding error so the big-M constraints hold.
            found = pre_activation_bounds(problem.net, box, Intermediate.CROWN,
                                          LowerSlope.ADAPTIVE)
            errors = rounding(problem.net, box)
            wide = {i: errors.widen(i, b) for i, b in found.boxes.items()}
            pre = PreActivations(wide, {i: relu_relaxation(b, LowerSlope.ADAPTIVE)
                                        for i, b in wide.items()})
        else:
            pre = PreActivations(boxes, {i: relu_relaxation(b, LowerSlope.ADAPTIVE)
                                         for i, b in boxes.items()})
        exact = float64_problem(model, box, C)
        return next(iter(programs(exact, pre, binaries=True, upper=False)))


def _graph_sample_program(model: nn.Module, problem: Problem, box: Box, C: Tensor,
                          boxes: dict[int, Box] | None) -> Program:
    """:func:`_one_sample_program` of a graph: over the given boxes of every relaxed op, or
    the certified root's (sound in floating point, so the big-M constraints hold)."""
    from tightrope.bounds.graph import box_relaxations, nonlinear_indices
    from tightrope.bounds.graph_certificate import graph_certified_root
    from tightrope.bounds.graph_encoding import graph_programs

    net = problem.net
    if boxes is None or set(boxes) != set(nonlinear_indices(net)):
        boxes = graph_certified_root(net, problem.box, rows=int(C.shape[-2])).boxes
    relaxations = box_relaxations(net, boxes)
    exact = float64_problem(model, box, C)
    return next(iter(graph_programs(exact.net, exact.box, _output_spec(exact), boxes,
                                    relaxations, binaries=True, upper=False)))


def _network_constraints(optimize: Any, program: Program, columns: int) -> list[Any]:
    """``program``'s equalities and inequalities as SciPy constraints over ``columns``
    variables (columns past the program's own get zero coefficients)."""
    import numpy as np

    constraints = []
    for matrix, rhs, equal in ((program.A_eq, program.b_eq, True),
                               (program.A_ub, program.b_ub, False)):
        if not rhs.numel():
            continue
        wide = SparseMatrix(matrix.rows, matrix.cols, matrix.values, (matrix.shape[0], columns))
        values = rhs.numpy()
        low = values if equal else np.full_like(values, -np.inf)
        constraints.append(optimize.LinearConstraint(to_scipy(wide), low, values))
    return constraints


def _milp_runner(
    program: Program, time_limit: float | None, caller: str = "milp_minimum", hint: str = ""
) -> Callable[[int], Any]:
    """A function solving row ``r`` of ``program``'s MILP and returning SciPy's result; a HiGHS
    failure raises ``RuntimeError`` naming ``caller`` (followed by ``hint``)."""
    optimize = load_scipy(caller)
    import numpy as np

    constraints = _network_constraints(optimize, program, program.objectives.shape[1])
    bounds = optimize.Bounds(program.lower.numpy(), program.upper.numpy())
    integrality = program.integer.numpy().astype(np.int64)
    # HiGHS's MIP presolve (probing) costs more than it saves on these small programs.
    options: dict[str, float | bool] = {
        "mip_rel_gap": MIP_RELATIVE_GAP, "presolve": False, "disp": False,
    }
    if time_limit is not None:
        options["time_limit"] = float(time_limit)

    def solve(row: int) -> Any:
        result = optimize.milp(
            program.objectives[row].numpy(), integrality=integrality, bounds=bounds,
            constraints=constraints, options=options,
        )
        if result.status not in (0, 1):
            raise RuntimeError(
                f"{caller}: HiGHS failed on the MILP (status {result.status}: "
                f"{result.message}){hint}"
            )
        return result

    return solve


def _milp_solver(program: Program, time_limit: float | None) -> Callable[[int], float]:
    run = _milp_runner(
        program, time_limit, "milp_bound",
        "; no sound bound can be read from it. An infeasible MILP means the pre-activation "
        "bounds exclude the network's own values.",
    )

    def solve(row: int) -> float:
        result = run(row)
        dual = getattr(result, "mip_dual_bound", None)
        if dual is None or math.isnan(dual):
            if result.status != 0:
                return -math.inf  # stopped before any bound was proven
            dual = result.fun
        return float(dual) + float(program.offsets[row])

    return solve


class MilpStatus(enum.Enum):
    """What :func:`milp_search` found out about the set it searched."""

    #: HiGHS proved that no input of the box meets every row.
    INFEASIBLE = "infeasible"
    #: HiGHS said infeasible, or failed, on a program whose numbers leave
    #: :data:`TRUSTED_RANGE`: no proof either way.
    UNTRUSTED = "untrusted"
    #: ``point`` meets every row, up to the solver's tolerances.
    FEASIBLE = "feasible"
    #: Stopped by the time limit first.
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class MilpSearch:
    """The answer of :func:`milp_search`.

    Attributes:
        status: the outcome (see :class:`MilpStatus`).
        point: ``(1, *S_in)`` float64 input found (``None`` unless ``FEASIBLE``).
        worst: the solver's ``max_r (C_r f(point) - thresholds_r)`` (NaN unless ``FEASIBLE``).
    """

    status: MilpStatus
    point: Tensor | None = None
    worst: float = math.nan


def milp_search(
    model: nn.Module,
    box: Box,
    C: Tensor,
    thresholds: Tensor,
    *,
    boxes: dict[int, Box] | None = None,
    time_limit: float | None = None,
    deadline: float | None = None,
    max_variables: int = DEFAULT_MAX_VARIABLES,
) -> MilpSearch:
    """Search the box for an input with ``C f(x) <= thresholds`` in every row, exactly.

    The conjunction of the rows is one MILP (Tjeng et al. 2019's encoding): minimise ``t``
    subject to ``C_r f(x) - thresholds_r <= t`` for every row and ``t <= 0``. The cap on ``t``
    acts as an objective cut-off, so HiGHS prunes every branch whose relaxation cannot reach
    the set; ``MilpStatus.INFEASIBLE`` is then a proof that the set is empty (as sound as HiGHS's
    floating-point LP solves, which hold to about 1e-7: keep a margin in ``thresholds``). A
    verifier asks whether an unsafe set ``C f(x) <= b`` is empty with ``thresholds = b +
    margin`` and re-checks a feasible ``point`` itself.

    Args:
        box: the input box ``(1, *S_in)``.
        C: ``(1, K, n_out)`` or ``(K, n_out)`` rows.
        thresholds: ``(K,)`` right-hand sides.
        boxes: sound pre-activation bounds ``(1, *S_i)`` per ReLU op index of the lowered
            network (e.g. alpha-CROWN's, which make the program much easier); CROWN's when
            ``None``.
        time_limit: seconds for the solve (``None``: no limit).
        deadline: ``time.monotonic()`` value by which the call returns (``None``: none): the
            time building the program takes counts against it, HiGHS gets what is left
            (``MilpStatus.UNKNOWN`` without solving when nothing is).
    """
    program = _one_sample_program(model, box, C, boxes, max_variables, "milp_search")
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            return MilpSearch(MilpStatus.UNKNOWN)
        time_limit = left if time_limit is None else min(time_limit, left)
    optimize = load_scipy("milp_search")
    import numpy as np

    rows, n = program.objectives.shape
    limits = thresholds.detach().to("cpu", torch.float64).flatten()
    if limits.numel() != rows:
        raise ValueError(f"thresholds must have one value per row ({rows}), got {limits.numel()}")
    # Variable n is t; row r reads objectives[r] . v - t <= thresholds[r] - offsets[r].
    dense = program.objectives
    at = dense.nonzero(as_tuple=True)
    cut = SparseMatrix(
        torch.cat([at[0], torch.arange(rows)]), torch.cat([at[1], torch.full((rows,), n)]),
        torch.cat([dense[at], -torch.ones(rows, dtype=torch.float64)]), (rows, n + 1),
    )
    constraints = [optimize.LinearConstraint(
        to_scipy(cut), np.full(rows, -np.inf), (limits - program.offsets).numpy())]
    constraints += _network_constraints(optimize, program, n + 1)
    lower = np.append(program.lower.numpy(), -np.inf)
    upper = np.append(program.upper.numpy(), 0.0)
    integrality = np.append(program.integer.numpy().astype(np.int64), 0)
    objective = np.zeros(n + 1)
    objective[n] = 1.0
    # With the cut-off, presolve pays for itself (it did not for milp_minimum's programs).
    options: dict[str, float | bool] = {"presolve": True, "disp": False}
    if time_limit is not None:
        options["time_limit"] = max(float(time_limit), 1e-3)
    result = optimize.milp(objective, integrality=integrality,
                           bounds=optimize.Bounds(lower, upper), constraints=constraints,
                           options=options)
    reliable = trusted(program, limits - program.offsets)
    if result.status == 2:
        return MilpSearch(MilpStatus.INFEASIBLE if reliable else MilpStatus.UNTRUSTED)
    if result.x is not None and result.status in (0, 1):
        point = torch.as_tensor(result.x[: int(box.lower[0].numel())], dtype=torch.float64)
        return MilpSearch(MilpStatus.FEASIBLE, point.view(1, *box.lower.shape[1:]),
                          float(result.fun))
    if result.status == 1:
        return MilpSearch(MilpStatus.UNKNOWN)
    if not reliable:  # e.g. "unbounded" for a bounded program with coefficients of 1e24
        return MilpSearch(MilpStatus.UNTRUSTED)
    raise RuntimeError(f"milp_search: HiGHS failed on the MILP (status {result.status}: "
                       f"{result.message})")
