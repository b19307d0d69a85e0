"""The LP oracle: the triangle relaxation of every unstable ReLU, solved exactly.

Wong & Kolter 2018 ("Provable Defenses against Adversarial Examples via the Convex Outer
Adversarial Polytope") relax ``y = relu(z)`` on ``z`` in ``[l, u]`` with ``l < 0 < u`` to its
convex hull ``y >= 0, y >= z, y <= u (z - l) / (u - l)``; stable neurons stay exact. With the
pre-activation bounds fixed, the LP optimum is at least as tight as CROWN with any lower slopes
(every slope in ``[0, 1]`` is one of the hull's supporting lines), so ``crown <= alpha_crown <=
lp_bound`` for lower bounds when all three use the same intermediate bounds. Solved with SciPy's
HiGHS, one LP per (sample, specification row, side).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from tightrope.bounds.core import Box
from tightrope.bounds.encoding import (
    DEFAULT_MAX_VARIABLES,
    Program,
    load_scipy,
    solve_rows,
    to_scipy,
)
from tightrope.bounds.linear import Intermediate
from tightrope.bounds.relaxation import LowerSlope

__all__ = ["lp_bound"]


def lp_bound(
    model: nn.Module,
    box: Box,
    C: Tensor | None = None,
    *,
    intermediate: Intermediate = Intermediate.CROWN,
    lower_slope: LowerSlope = LowerSlope.ADAPTIVE,
    upper: bool = True,
    max_variables: int = DEFAULT_MAX_VARIABLES,
) -> Box:
    """Bounds on ``C f(x)`` over ``box`` from the triangle-relaxation LP (Wong & Kolter 2018).

    The pre-activation bounds are those of ``crown(model, box, C, intermediate=...,
    lower_slope=...)`` (computed in the model's dtype and device); the LP itself is built and
    solved in float64 on the CPU. Each returned bound is the value of the Lagrangian at the
    solver's optimal dual multipliers, which is a valid bound for *any* multipliers, so it does
    not rely on the solver's feasibility tolerances. Not differentiable. Needs SciPy
    (``pip install tightrope-bounds[oracles]``).

    Args:
        model: any supported model, a chain or a graph (see
            :func:`tightrope.bounds.lower`).
        box: input box ``(B, *S_in)``.
        C: ``(B, K, n_out)`` or ``(K, n_out)`` specification; ``None`` bounds ``f`` itself.
        intermediate: pre-activation bounds by ``Intermediate.CROWN`` or ``Intermediate.IBP``,
            as in ``crown``.
        lower_slope: lower-slope policy used for the CROWN intermediate bounds.
        upper: compute upper bounds too (else they are ``+inf``; half the solves).
        max_variables: refuse (``ValueError``) networks whose LP has more variables
            (inputs + 2 per ReLU neuron).

    Returns:
        Box ``(B, K)``, or ``(B, *S_out)`` when ``C`` is None, in the box's dtype and device.

    Raises:
        RuntimeError: when HiGHS does not report an optimal solution.
    """
    return solve_rows(
        model, box, C, intermediate=intermediate, lower_slope=lower_slope, upper=upper,
        binaries=False, max_variables=max_variables, caller="lp_bound", solve=_lp_solver,
    )


def _lp_solver(program: Program) -> Callable[[int], float]:
    optimize = load_scipy("lp_bound")
    import numpy as np

    has_eq, has_ub = program.b_eq.numel() > 0, program.b_ub.numel() > 0
    A_eq = to_scipy(program.A_eq) if has_eq else None
    A_ub = to_scipy(program.A_ub) if has_ub else None
    b_eq, b_ub = program.b_eq.numpy(), program.b_ub.numpy()
    lower, upper = program.lower.numpy(), program.upper.numpy()
    bounds = np.column_stack([lower, upper])

    def solve(row: int) -> float:
        c = program.objectives[row].numpy()
        result = optimize.linprog(
            c, A_ub=A_ub, b_ub=b_ub if has_ub else None, A_eq=A_eq,
            b_eq=b_eq if has_eq else None, bounds=bounds, method="highs",
        )
        if result.status != 0:
            raise RuntimeError(
                f"lp_bound: HiGHS did not solve the LP to optimality (status {result.status}: "
                f"{result.message}); no sound bound can be read from it. An infeasible LP "
                "means the pre-activation bounds exclude the network's own values."
            )
        multipliers_eq = result.eqlin.marginals if has_eq else np.zeros(0)
        multipliers_ub = np.minimum(result.ineqlin.marginals, 0.0) if has_ub else np.zeros(0)
        bound = lagrangian_bound(
            c, A_eq, b_eq, multipliers_eq, A_ub, b_ub, multipliers_ub, lower, upper
        )
        return bound + float(program.offsets[row])

    return solve


def lagrangian_bound(
    c: Any, A_eq: Any, b_eq: Any, multipliers_eq: Any, A_ub: Any, b_ub: Any,
    multipliers_ub: Any, lower: Any, upper: Any,
) -> float:
    """A lower bound of ``min c.v`` s.t. ``A_eq v = b_eq, A_ub v <= b_ub, lower <= v <= upper``.

    Weak duality: for any ``multipliers_eq`` and any ``multipliers_ub <= 0`` (SciPy's sign
    convention: the sensitivities of the optimum to ``b``), every feasible ``v`` has
    ``c.v >= r.v + multipliers_eq.b_eq + multipliers_ub.b_ub`` with reduced costs
    ``r = c - A_eq^T multipliers_eq - A_ub^T multipliers_ub``, and ``r.v`` is bounded below on
    the box by ``sum min(r lower, r upper)``. All bounds must be finite.
    """
    import numpy as np

    reduced = np.array(c, dtype=np.float64, copy=True)
    value = 0.0
    if A_eq is not None:
        reduced -= A_eq.T @ multipliers_eq
        value += float(multipliers_eq @ b_eq)
    if A_ub is not None:
        if bool((multipliers_ub > 0).any()):
            raise ValueError("inequality multipliers must be <= 0")
        reduced -= A_ub.T @ multipliers_ub
        value += float(multipliers_ub @ b_ub)
    value += float(np.minimum(reduced * lower, reduced * upper).sum())
    return value
