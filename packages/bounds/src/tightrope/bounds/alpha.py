"""alpha-CROWN: CROWN with optimised lower ReLU slopes (Xu et al. 2021, "Fast and Complete:
Enabling Complete Neural Network Verification with Rapid and Massively Parallel Incomplete
Verifiers").

Any lower slope in ``[0, 1]`` gives a sound bound, so the slopes of the unstable ReLUs are
free variables: one per neuron and per output row, optimised by projected gradient ascent on
the bound (Adam, then clamping to ``[0, 1]``). The search starts at the slopes of the chosen
policy (CROWN's by default) and every row keeps the best bound it has seen, so the result is
never looser than ``crown`` with the same intermediate bounds. Intermediate bounds are those
of ``crown`` (or of IBP) and stay fixed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tightrope.bounds.ascent import ascend_slopes
from tightrope.bounds.backward import lower_bound
from tightrope.bounds.core import Box
from tightrope.bounds.linear import (
    Intermediate,
    PreActivations,
    _output_spec,
    _reshape_result,
    pre_activation_bounds,
)
from tightrope.bounds.network import Network
from tightrope.bounds.problem import prepare
from tightrope.bounds.relaxation import LowerSlope, ReluRelaxation

__all__ = ["alpha_crown"]


def alpha_crown(
    model: nn.Module,
    box: Box,
    C: Tensor | None = None,
    *,
    steps: int = 20,
    lr: float = 0.1,
    intermediate: Intermediate = Intermediate.CROWN,
    lower_slope: LowerSlope = LowerSlope.ADAPTIVE,
    upper: bool = True,
) -> Box:
    """Bounds on ``C f(x)`` over ``box`` with lower ReLU slopes optimised per neuron and row.

    Differentiable with respect to the model's parameters at the optimised slopes (the slopes
    themselves are treated as constants). Parameter gradients are never accumulated by the
    optimisation.

    Args:
        model: a chain of supported affine layers and ReLUs (every ``nn.Sequential`` of
            them); graphs raise ``NotImplementedError`` (see :mod:`tightrope.bounds.graph`).
        box: input box ``(B, *S_in)``.
        C: ``(B, K, n_out)`` or ``(K, n_out)`` specification; ``None`` bounds ``f`` itself.
        steps: gradient steps (0 returns ``crown``'s bounds).
        lr: Adam learning rate on the slopes.
        intermediate: pre-activation bounds by ``Intermediate.CROWN`` or ``Intermediate.IBP``,
            as in ``crown``.
        lower_slope: policy of the starting slopes.
        upper: optimise and return upper bounds too (else they are ``+inf``).

    Returns:
        Box ``(B, K)``, or ``(B, *S_out)`` when ``C`` is None.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if torch.is_inference_mode_enabled():
        # The slopes are optimised by autograd, which inference tensors cannot enter: leave
        # inference mode and copy the inputs out of it.
        with torch.inference_mode(False):
            box = Box(box.lower.clone(), box.upper.clone())
            return alpha_crown(
                model, box, None if C is None else C.clone(), steps=steps, lr=lr,
                intermediate=intermediate, lower_slope=lower_slope, upper=upper,
            )
    problem = prepare(model, box, C)
    net = problem.net
    pre = pre_activation_bounds(net, box, intermediate, lower_slope)
    spec = _output_spec(problem)
    rows = spec.shape[1]
    coefficients = torch.cat([spec, -spec], dim=1) if upper else spec
    slopes = optimise_slopes(net, coefficients, box, pre, steps=steps, lr=lr)
    bound = lower_bound(net, len(net.ops), coefficients, box, pre.relaxations, slopes)
    if upper:
        result = Box(bound[:, :rows], -bound[:, rows:])
    else:
        result = Box(bound, torch.full_like(bound, float("inf")))
    return _reshape_result(problem, result)


def optimise_slopes(
    net: Network,
    A: Tensor,
    box: Box,
    pre: PreActivations,
    *,
    steps: int,
    lr: float,
) -> dict[int, Tensor]:
    """Per-row lower slopes ``(B, R, *S)`` for every ReLU maximising ``min A f`` over ``box``.

    Returns, for every row, the slopes of the best bound seen (detached); stable neurons keep
    their exact slopes.
    """
    end = len(net.ops)
    A = A.detach()
    rows = A.shape[1]
    fixed = {i: r.lower_slope.detach().unsqueeze(1) for i, r in pre.relaxations.items()}
    unstable = {i: r.unstable.unsqueeze(1) for i, r in pre.relaxations.items()}
    relaxations = {
        i: ReluRelaxation(
            r.lower_slope.detach(), r.upper_slope.detach(), r.upper_intercept.detach(), r.unstable
        )
        for i, r in pre.relaxations.items()
    }
    free = {
        i: f.expand(f.shape[0], rows, *f.shape[2:]).clone()
        for i, f in fixed.items()
    }

    def bound_of(free: dict[int, Tensor]) -> Tensor:
        slopes = {i: torch.where(unstable[i], s, fixed[i]) for i, s in free.items()}
        return lower_bound(net, end, A, box, relaxations, slopes)

    return ascend_slopes(free, bound_of, steps=steps, lr=lr)
