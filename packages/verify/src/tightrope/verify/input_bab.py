"""Branch-and-bound over the input box, for low-dimensional inputs.

With few input dimensions, bisecting the box shrinks every pre-activation interval at once and
beats ReLU splitting (ReluVal, Wang et al. 2018; the input split of alpha-beta-CROWN). The
cascade chooses it when the input has at most ``BabConfig.input_split_max_dim`` elements
(:class:`~tightrope.verify.config.InputSplit`). One search covers all the open unsafe sets of a
region at once, so a sub-box is bounded once whatever the number of sets:

* **Bounding.** Thousands of sub-boxes per call (``INPUT_BATCH_FACTOR x batch_size``): CROWN
  pre-activation bounds in the verifier's dtype, widened by their rounding error, then CROWN at
  the output, its value certified by the dual bound
  (:func:`tightrope.bounds.certified_split_bound`).
  A sub-box keeps the unsafe sets not yet excluded on it; it is closed when none is left (a set
  is excluded when one of its rows has a sound lower bound above the margin).
  Optimising the output slopes (alpha-CROWN) was measured and left out: on ACAS Xu it
  barely moved the values and its input coefficients made worse split choices.
* **Branching.** Each open sub-box is bisected along the dimension whose halving is predicted
  to raise its bound most: the gradient of the weakest set's CROWN bound with respect to the
  box's ends, taken through the intermediate bounds (run in the model's own dtype: a heuristic
  needs no rigour). Halving dimension ``d`` moves one end of each child by ``w_d / 2``, so the
  predicted gain is ``(dV/dl_d - dV/du_d) w_d / 2``. This sees what the output coefficients
  alone do not: how much a dimension loosens the intermediate relaxations. On ACAS Xu it needed
  10-40x fewer sub-boxes than ``|coefficient| x width`` (the linear bound's own sensitivity).
* **Order.** Lowest bound first (the sub-boxes most likely to hold a counterexample); the open
  pool is capped at ``BabConfig.max_domains``.
* **Counterexamples.** The corners minimising each sub-box's linear bound and the sub-box
  centres are checked on every call, and a short PGD starts from the minimisers of the weakest
  quarter of the sub-boxes left open (every call unless ``BabConfig.attack_every`` is 0: the
  calls are few and PGD on a small network is cheap). Every candidate is re-checked in float64
  before it counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tightrope.bounds import (
    Box,
    Intermediate,
    Network,
    SplitBound,
    certified_split_bound,
    pre_activation_bounds,
    split_lower_bound,
)
from tightrope.verify.attack import spec_pgd
from tightrope.verify.bab import BabOutcome, minimisers
from tightrope.verify.config import BabConfig
from tightrope.verify.problem import CompiledRegion, clip_inside, violation
from tightrope.verify.sound import Lowered, widened
from tightrope.verify.spec import VerifyStatus

__all__ = ["INPUT_BATCH_FACTOR", "input_bab", "split_dimension"]

#: Sub-boxes per bound call, as a multiple of ``BabConfig.batch_size``.
INPUT_BATCH_FACTOR = 4
#: The share of a bound call's sub-boxes whose minimisers seed its PGD attack (the weakest).
#: Wide seeding matters: on ACAS Xu ``prop_7`` (net 1_9), 256 seeds per call found the
#: counterexample in under 2 s, 16-64 seeds had not after 60 s.
ATTACK_SHARE = 0.25


def input_bab(
    model: nn.Module,
    nets: Lowered,
    region: CompiledRegion,
    search_region: CompiledRegion,
    targets: Tensor,
    confirm: Callable[[Tensor], tuple[Tensor, Tensor] | None],
    *,
    config: BabConfig,
    margin: float,
    deadline: float,
    generator: torch.Generator,
) -> BabOutcome:
    """Show every unsafe set flagged in ``targets: (U,)`` infeasible on ``region`` by bisecting
    its input box, or find a counterexample.

    Other arguments as :func:`tightrope.verify.bab.relu_bab`. ``VERIFIED`` when every sub-box
    is closed; ``UNKNOWN`` when the pool outgrows ``config.max_domains`` or a sub-box has no
    width left to split; ``TIMEOUT`` at ``deadline``.
    """
    rows_of = region.rows_of(targets)
    rows = _Rows(region.rows[rows_of].reshape(-1, *nets.exact.output_shape),
                 region.offsets[rows_of],
                 # Each row's unsafe set, renumbered 0..S-1 over the flagged sets.
                 torch.unique(region.owner[rows_of], return_inverse=True)[1])
    if rows.n_sets == 0:
        return BabOutcome(VerifyStatus.VERIFIED)
    active = _region_sets(region, targets)
    lower, upper = region.box.lower, region.box.upper
    open_sets = torch.ones((1, rows.n_sets), dtype=torch.bool, device=lower.device)
    priority = lower.new_full((1,), -math.inf)
    batch = INPUT_BATCH_FACTOR * config.batch_size
    bounded = 0
    while lower.shape[0]:
        if time.monotonic() > deadline:
            return BabOutcome(VerifyStatus.TIMEOUT, domains=bounded)
        take = min(batch, lower.shape[0])
        chosen = torch.topk(priority, take, largest=False).indices
        rest = torch.ones_like(priority, dtype=torch.bool)
        rest[chosen] = False
        boxes = Box(lower[chosen], upper[chosen])
        result = _bound(nets, boxes, rows, open_sets[chosen], margin)
        lower, upper, open_sets, priority = (lower[rest], upper[rest], open_sets[rest],
                                             priority[rest])
        bounded += take

        search_boxes = nets.search_box(boxes)
        corners = minimisers(result.found, search_boxes, result.row)
        candidates = clip_inside(search_region, torch.cat([corners, search_boxes.center]))
        with torch.no_grad():
            unsafe = violation(search_region, model(candidates), active) <= 0
        hit = confirm(candidates[unsafe]) if bool(unsafe.any()) else None
        if hit is not None:
            return BabOutcome(VerifyStatus.FALSIFIED, hit[0], hit[1], domains=bounded)

        keep = result.sets.any(dim=1)
        if not bool(keep.any()):
            continue
        kept = Box(boxes.lower[keep], boxes.upper[keep])
        dimension = split_dimension(nets.search, nets.search_box(kept),
                                    nets.to_search(rows.rows), result.row[keep],
                                    result.found.input_coefficients[keep])
        if dimension is None:
            return BabOutcome(VerifyStatus.UNKNOWN, domains=bounded)
        left, right = _bisect(kept, dimension)
        value = result.weakest[keep]
        lower = torch.cat([lower, left.lower, right.lower])
        upper = torch.cat([upper, left.upper, right.upper])
        open_sets = torch.cat([open_sets, result.sets[keep], result.sets[keep]])
        priority = torch.cat([priority, value, value])
        if lower.shape[0] > config.max_domains:
            return BabOutcome(VerifyStatus.UNKNOWN, domains=bounded)

        if config.attack_every:
            count = min(max(1, int(ATTACK_SHARE * batch)), value.shape[0])
            starts = corners[keep][torch.topk(value, count, largest=False).indices]
            candidates = spec_pgd(model, search_region, steps=20, restarts=0,
                                  generator=generator, starts=starts, active=active,
                                  deadline=deadline)
            hit = confirm(candidates) if candidates.shape[0] else None
            if hit is not None:
                return BabOutcome(VerifyStatus.FALSIFIED, hit[0], hit[1], domains=bounded)
    return BabOutcome(VerifyStatus.VERIFIED, domains=bounded)


@dataclass(frozen=True, slots=True)
class _Rows:
    """The rows of the unsafe sets searched: ``rows: (R, *out)``, ``offsets: (R,)`` and each
    row's set ``owner: (R,)`` in ``0..n_sets-1``."""

    rows: Tensor
    offsets: Tensor
    owner: Tensor

    @property
    def n_sets(self) -> int:
        return int(self.owner.max()) + 1 if self.owner.numel() else 0


@dataclass(frozen=True, slots=True)
class _Bounded:
    """One bound call on ``N`` sub-boxes: the search's bound (its input coefficients), the sets
    still open on each sub-box ``(N, S)``, the weakest open set's bound ``(N,)`` (``inf`` when
    none is open) and the row it rests on ``(N,)``."""

    found: SplitBound
    sets: Tensor
    weakest: Tensor
    row: Tensor


def _bound(nets: Lowered, boxes: Box, rows: _Rows, sets: Tensor, margin: float) -> _Bounded:
    """CROWN on ``boxes``, certified by the dual bound; a set stays open on a sub-box until one
    of its rows has a sound lower bound above ``margin`` (and stays excluded in children)."""
    with torch.no_grad():
        # The root box's rounding errors hold on every sub-box (smaller magnitudes).
        pre = widened(nets.rounding, pre_activation_bounds(nets.exact, boxes).boxes)
    count = boxes.lower.shape[0]
    C = rows.rows.unsqueeze(0).expand(count, *rows.rows.shape)
    found, sound = certified_split_bound(nets.exact, boxes, C, pre, {}, search=nets.search,
                                         steps=0, offsets=rows.offsets)
    per_set = sound.new_full((count, rows.n_sets), -math.inf).scatter_reduce(
        1, rows.owner.expand(count, -1), sound, reduce="amax")
    sets = sets & ~(per_set > margin)
    weakest = torch.where(sets, per_set, torch.full_like(per_set, math.inf)).min(dim=1)
    # The weakest open set's best row.
    row_value = torch.where(rows.owner.unsqueeze(0) == weakest.indices.unsqueeze(1), sound,
                            torch.full_like(sound, -math.inf))
    return _Bounded(found, sets, weakest.values, row_value.argmax(dim=1))


def _region_sets(region: CompiledRegion, targets: Tensor) -> Tensor:
    """``targets`` as the ``(U,)`` mask :func:`violation` takes (a copy, on the region's device)."""
    return targets.to(device=region.rows.device, dtype=torch.bool).clone()


def split_dimension(
    search: Network, boxes: Box, rows: Tensor, row: Tensor, coefficients: Tensor
) -> Tensor | None:
    """``(N,)``: for each box ``(N, *S)``, the flat input dimension to bisect, or ``None`` when
    some box has no width left.

    The score of dimension ``d`` is the predicted gain of the CROWN bound ``V`` of row ``row``
    of ``rows: (K, *out)`` over both halves: ``(dV/dl_d - dV/du_d) w_d / 2``, the gradient
    taken through the intermediate bounds on ``search``. ``coefficients: (N, K, *S)`` (the
    output bound's input coefficients) break ties and stand in where the gradient is not
    finite: ``|a_d| w_d``.
    """
    flat_lower, flat_upper = boxes.lower.flatten(1), boxes.upper.flatten(1)
    width = flat_upper - flat_lower
    if bool((width.max(dim=1).values <= 0).any()):
        return None
    shape = boxes.lower.shape[1:]
    lower = boxes.lower.detach().clone().requires_grad_(True)
    upper = boxes.upper.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        box = Box(lower, upper)
        pre = pre_activation_bounds(search, box, Intermediate.CROWN).boxes
        picked = rows[row].unsqueeze(1)
        value = split_lower_bound(search, box, picked, pre, {}).lower
        d_lower, d_upper = torch.autograd.grad(value.sum(), [lower, upper])
    gain = ((d_lower - d_upper).flatten(1) * width / 2).to(width.dtype)
    gain = torch.where(torch.isfinite(gain), gain, torch.zeros_like(gain))
    pick = row.view(-1, 1, *([1] * len(shape))).expand(-1, 1, *shape)
    sensitivity = coefficients.gather(1, pick).squeeze(1).flatten(1).abs().to(width.dtype)
    sensitivity = torch.where(torch.isfinite(sensitivity), sensitivity,
                              torch.zeros_like(sensitivity))
    score = gain + 1e-9 * sensitivity * width + 1e-30 * width
    score = torch.where(width > 0, score, torch.full_like(score, -math.inf))
    return score.argmax(dim=1)


def _bisect(boxes: Box, dimension: Tensor) -> tuple[Box, Box]:
    """Both halves of each box ``(N, *S)``, cut at the middle of flat ``dimension: (N,)``."""
    shape = boxes.lower.shape[1:]
    flat_lower, flat_upper = boxes.lower.flatten(1), boxes.upper.flatten(1)
    index = torch.arange(flat_lower.shape[0], device=flat_lower.device)
    middle = (flat_lower[index, dimension] + flat_upper[index, dimension]) / 2
    left_upper, right_lower = flat_upper.clone(), flat_lower.clone()
    left_upper[index, dimension] = middle
    right_lower[index, dimension] = middle
    return (Box(flat_lower.view(-1, *shape), left_upper.view(-1, *shape)),
            Box(right_lower.view(-1, *shape), flat_upper.view(-1, *shape)))
