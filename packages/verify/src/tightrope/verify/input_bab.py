"""Branch-and-bound over the input box, for low-dimensional inputs.

With few input dimensions, bisecting the box shrinks every pre-activation interval at once and
beats ReLU splitting (as in ReluVal, Wang et al. 2018, and alpha-beta-CROWN's input split). A
subdomain is a sub-box; it is bounded by CROWN intermediates and alpha-CROWN at the output
(Xu et al. 2021), closed when some row of ``A f(x) - b`` has a lower bound above the margin,
and otherwise bisected along the dimension with the largest ``|coefficient| x width`` in its
linear bound (the dimension the bound is most sensitive to). Box corners minimising the bounds
and box centres are counterexample candidates, re-checked in float64.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from tightrope.bounds import Box, Intermediate, certified_split_bound, pre_activation_bounds
from tightrope.verify.bab import BabOutcome, minimisers
from tightrope.verify.config import BabConfig
from tightrope.verify.problem import CompiledRegion, clip_inside, violation
from tightrope.verify.sound import Lowered, widened
from tightrope.verify.spec import VerifyStatus

__all__ = ["input_bab"]

#: alpha steps per input subdomain.
INPUT_STEPS = 5


def input_bab(
    model: nn.Module,
    nets: Lowered,
    region: CompiledRegion,
    search_region: CompiledRegion,
    target: int,
    confirm: Callable[[Tensor], tuple[Tensor, Tensor] | None],
    *,
    config: BabConfig,
    margin: float,
    deadline: float,
    generator: torch.Generator,
) -> BabOutcome:
    """Show unsafe set ``target`` of ``region`` infeasible by bisecting the input box.

    Arguments as :func:`tightrope.verify.bab.relu_bab`.
    """
    del generator  # the candidates here are deterministic (corners and centres)
    net, search = nets.exact, nets.search
    mask = region.owner == target
    rows = region.rows[mask].reshape(-1, *net.output_shape)
    offsets = region.offsets[mask]
    active = torch.zeros(region.n_sets, dtype=torch.bool, device=rows.device)
    active[target] = True
    lower, upper = region.box.lower, region.box.upper
    bounded = 0
    max_open = max(config.max_domains, 2 * config.batch_size)
    while lower.shape[0]:
        if time.monotonic() > deadline:
            return BabOutcome(VerifyStatus.TIMEOUT, domains=bounded)
        # The open sub-boxes, bounded in chunks of at most 2 * batch_size per call.
        kept_lower, kept_upper = [], []
        for begin in range(0, lower.shape[0], 2 * config.batch_size):
            boxes = Box(lower[begin : begin + 2 * config.batch_size],
                        upper[begin : begin + 2 * config.batch_size])
            with torch.no_grad():
                # The root box's rounding errors hold on every sub-box (smaller magnitudes).
                crown_pre = pre_activation_bounds(net, boxes, Intermediate.CROWN)
                pre = widened(nets.rounding, crown_pre.boxes)
            C = rows.unsqueeze(0).expand(boxes.lower.shape[0], *rows.shape)
            found, sound = certified_split_bound(net, boxes, C, pre, {}, search=search,
                                                 steps=INPUT_STEPS, lr_alpha=config.lr_alpha,
                                                 offsets=offsets)
            bounded += boxes.lower.shape[0]
            value, row = sound.max(dim=1)
            search_boxes = nets.search_box(boxes)
            candidates = torch.cat([minimisers(found, search_boxes, row), search_boxes.center])
            candidates = clip_inside(search_region, candidates)
            with torch.no_grad():
                hits = candidates[violation(search_region, model(candidates), active) <= 0]
            hit = confirm(hits) if hits.shape[0] else None
            if hit is not None:
                return BabOutcome(VerifyStatus.FALSIFIED, hit[0], hit[1], domains=bounded)
            keep = value <= margin
            if not bool(keep.any()):
                continue
            halves = _bisect(boxes.lower[keep], boxes.upper[keep],
                             found.input_coefficients[keep], row[keep])
            if halves is None:
                return BabOutcome(VerifyStatus.UNKNOWN, domains=bounded)
            kept_lower.append(halves[0])
            kept_upper.append(halves[1])
        if not kept_lower:
            break
        lower, upper = torch.cat(kept_lower), torch.cat(kept_upper)
        if lower.shape[0] > max_open:
            return BabOutcome(VerifyStatus.UNKNOWN, domains=bounded)
    return BabOutcome(VerifyStatus.VERIFIED, domains=bounded)


def _bisect(
    lower: Tensor, upper: Tensor, coefficients: Tensor, row: Tensor
) -> tuple[Tensor, Tensor] | None:
    """Both halves of each box ``(N, *S)``, cut along its most influential dimension.

    ``coefficients: (N, K, *S)`` are the input coefficients of the linear bounds and ``row: (N,)``
    the row each box's value rests on. ``None`` when some box has no width left.
    """
    pick = row.view(-1, 1, *([1] * (lower.dim() - 1))).expand(-1, 1, *lower.shape[1:])
    chosen = coefficients.gather(1, pick).squeeze(1).flatten(1)
    flat_lower, flat_upper = lower.flatten(1), upper.flatten(1)
    width = flat_upper - flat_lower
    if bool((width.max(dim=1).values <= 0).any()):
        return None
    score = torch.where(width > 0, chosen.abs() * width + 1e-12 * width,
                        torch.full_like(width, -1.0))
    dim = score.argmax(dim=1)
    index = torch.arange(lower.shape[0], device=lower.device)
    middle = (flat_lower[index, dim] + flat_upper[index, dim]) / 2
    left_upper, right_lower = flat_upper.clone(), flat_lower.clone()
    left_upper[index, dim] = middle
    right_lower[index, dim] = middle
    shape = lower.shape[1:]
    return (torch.cat([flat_lower, right_lower]).view(-1, *shape),
            torch.cat([left_upper, flat_upper]).view(-1, *shape))
