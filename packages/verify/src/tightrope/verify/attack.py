"""Counterexample search for general specifications: projected sign-gradient descent.

Minimises the violation ``min over unsafe sets of max over rows (A_r f(x) - b_r)`` inside a
box (PGD, Madry et al. 2018, with random restarts and a decaying step), so it covers VNN-COMP
disjunctions as well as robustness margins. Candidates with violation ``<= 0`` are only
proposals: the caller re-checks them with a float64 forward pass
(:func:`tightrope.verify.problem.confirm`).
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

from tightrope.bounds import Box
from tightrope.verify.problem import CompiledRegion, set_values

__all__ = ["spec_pgd"]


def spec_pgd(
    model: nn.Module,
    region: CompiledRegion,
    *,
    steps: int,
    restarts: int,
    generator: torch.Generator,
    box: Box | None = None,
    starts: Tensor | None = None,
    active: Tensor | None = None,
    targeted: bool = False,
    deadline: float = math.inf,
) -> Tensor:
    """Candidate counterexamples, best first: ``(N, *S_in)`` with violation ``<= 0`` (N may be 0).

    Args:
        model: eval-mode network.
        region: the compiled region (its box unless ``box`` is given).
        steps: gradient steps per restart.
        restarts: random starting points (uniform in the box), besides ``starts``.
        generator: randomness for the starting points.
        box: ``(1, *S_in)`` sub-box to search in (e.g. a subdomain's), default the region's
            inward-rounded box.
        starts: ``(M, *S_in)`` extra starting points (projected into the box).
        active: ``(U,)`` unsafe sets to target (default all).
        targeted: give each random restart one (active) unsafe set to reach, in turn, instead
            of the nearest one (stronger on disjunctions: each set gets its own descent).
        deadline: ``time.monotonic()`` value after which the search stops early.
    """
    box = region.inner if box is None else box
    lower, upper = box.lower, box.upper
    shape = (restarts, *lower.shape[1:])
    noise = torch.rand(shape, generator=generator, dtype=lower.dtype, device="cpu")
    points = [lower + noise.to(lower.device) * (upper - lower)]
    if starts is not None:
        points.append(torch.minimum(torch.maximum(starts.to(lower), lower), upper))
    x = torch.cat(points).detach()
    if x.shape[0] == 0:
        return x
    width = upper - lower
    sets = torch.arange(region.n_sets, device=x.device)
    if active is not None:
        sets = sets[active]
    goal = None
    if targeted and sets.numel():
        goal = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        goal[:restarts] = sets.repeat(restarts // sets.numel() + 1)[:restarts]
    best_x, best_value = x.clone(), torch.full((x.shape[0],), math.inf, dtype=x.dtype)
    best_value = best_value.to(x.device)
    for step in range(steps + 1):
        with torch.enable_grad():
            x.requires_grad_(True)
            per_set = set_values(region, model(x), active)
            value = per_set.min(dim=1).values
            objective = value
            if goal is not None:
                mine = per_set.gather(1, goal.clamp(min=0).unsqueeze(1)).squeeze(1)
                objective = torch.where(goal >= 0, mine, value)
            gradient = torch.autograd.grad(objective.sum(), x)[0] if step < steps else None
        value = value.detach()
        x = x.detach()
        better = value < best_value
        best_value = torch.where(better, value, best_value)
        best_x[better] = x[better]
        if gradient is None or (bool((best_value <= 0).any()) and step >= 2):
            break
        if time.monotonic() > deadline:
            break
        # Cosine decay from a quarter of the box width down to nearly nothing.
        size = 0.25 * (1 + math.cos(math.pi * step / max(steps, 1))) / 2 + 1e-3
        x = x - size * width * gradient.sign()
        x = torch.minimum(torch.maximum(x, lower), upper)
    found = best_value <= 0
    order = torch.argsort(best_value[found])
    return best_x[found][order]
