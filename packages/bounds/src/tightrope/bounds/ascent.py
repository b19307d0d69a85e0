"""The projected Adam ascent on per-row lower ReLU slopes that alpha-CROWN runs, on chains
(:func:`tightrope.bounds.alpha.optimise_slopes`) and on graphs
(:func:`tightrope.bounds.graph.optimise_row_slopes`) alike."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ascend_slopes"]


def ascend_slopes(free: dict[int, Tensor], bound_of: Callable[[dict[int, Tensor]], Tensor], *,
                  steps: int, lr: float, deadline: float | None = None) -> dict[int, Tensor]:
    """Maximise ``bound_of(free): (B, R)`` over the slopes ``free`` (``(B, R, *S)`` each, made
    leaves here) with ``steps`` Adam steps, each followed by clipping to ``[0, 1]``; returns,
    for every row, the slopes of the best bound seen (detached). Stops early at ``deadline``
    (``time.monotonic()``)."""
    best_slopes = {i: s.detach().clone() for i, s in free.items()}
    if steps == 0 or not free:
        return best_slopes
    for parameter in free.values():
        parameter.requires_grad_(True)
    best: Tensor | None = None
    optimizer = torch.optim.Adam(list(free.values()), lr=lr)
    for step in range(steps + 1):
        with torch.enable_grad():
            bound = bound_of(free)
            found = bound.detach()
            if best is None:
                best = torch.full_like(found, float("-inf"))
            improved = found > best  # a NaN bound never improves a row
            best = torch.where(improved, found, best)
            for i, slope in free.items():
                mask = improved.view(*improved.shape, *([1] * (slope.dim() - 2)))
                best_slopes[i] = torch.where(mask, slope.detach(), best_slopes[i])
            if step == steps or (deadline is not None and time.monotonic() > deadline):
                break
            gradients = torch.autograd.grad(-bound.sum(), list(free.values()),
                                            allow_unused=True, materialize_grads=True)
        for parameter, gradient in zip(free.values(), gradients, strict=True):
            parameter.grad = gradient
        optimizer.step()
        with torch.no_grad():
            for parameter in free.values():
                parameter.clamp_(0.0, 1.0)
    return best_slopes
