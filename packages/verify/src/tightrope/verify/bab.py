"""Branch-and-bound over ReLU phases with beta-CROWN bounds (Wang et al. 2021).

One unsafe set ``A y <= b`` over one input box is shown infeasible by splitting: a subdomain
fixes some ReLU phases; its bound is beta-CROWN's (split constraints with multipliers, lower
slopes optimised with them, :mod:`tightrope.bounds.beta`); a subdomain is closed when some row
of ``A f(x) - b`` has a lower bound above the margin, or when its phases contradict the
pre-activation bounds (empty). The search takes a batch of open subdomains at a time (lowest
bound first, or deepest first above the memory cap), picks a neuron per subdomain (BaBSR or
FSB, :mod:`tightrope.verify.branching`), bounds both children in one batched call and keeps the
open ones. Every bound's minimising input, and a PGD attack started from the worst subdomains'
minimisers, are counterexample candidates; only a float64 re-check makes one a counterexample.

The answer is ``VERIFIED`` only when every subdomain is closed, ``FALSIFIED`` only with a
re-checked counterexample, ``TIMEOUT`` when the deadline passes and ``UNKNOWN`` when an open
subdomain has no neuron left to split (its phases are all fixed but the bound stays below the
margin) or the memory cap is reached in depth-first order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from tightrope.bounds import (
    Box,
    Network,
    SplitBound,
    apply_splits,
    certified_split_bound,
    empty_subdomains,
    refine_pre_activations,
)
from tightrope.bounds.graph_certificate import graph_sound_interval
from tightrope.verify.attack import spec_pgd
from tightrope.verify.branching import (
    LayerIndex,
    branching_scores,
    fsb_choice,
    shallow_first,
    split_at,
)
from tightrope.verify.config import BabConfig, Branching, LayerOrder, SearchOrder
from tightrope.verify.domains import DomainBatch, DomainQueue
from tightrope.verify.problem import CompiledRegion, clip_inside, violation
from tightrope.verify.sound import Lowered, widened
from tightrope.verify.spec import VerifyStatus

__all__ = ["BabOutcome", "refine_after_splits", "relu_bab"]

#: Largest share of the remaining time one branch-and-bound iteration should take.
ITERATION_SHARE = 0.05
#: Smallest number of parents per iteration.
MIN_BATCH = 4

#: Memory the queue may hold before best-first search turns depth-first.
QUEUE_BYTES = 3 << 30

Confirm = Callable[[Tensor], "tuple[Tensor, Tensor] | None"]


@dataclass(frozen=True, slots=True)
class BabOutcome:
    """The answer of one search: status, counterexample (with its float64 output) if any,
    and how many subdomains were bounded."""

    status: VerifyStatus
    counterexample: Tensor | None = None
    output: Tensor | None = None
    domains: int = 0


def minimisers(found: SplitBound, box: Box, row: Tensor) -> Tensor:
    """``(D, *S_in)``: the input corner minimising each subdomain's linear bound of ``row``."""
    pick = row.view(-1, 1, *([1] * (found.input_coefficients.dim() - 2)))
    pick = pick.expand(-1, 1, *found.input_coefficients.shape[2:])
    coefficients = found.input_coefficients.gather(1, pick).squeeze(1)
    return torch.where(coefficients > 0, box.lower, box.upper)


def relu_bab(
    model: nn.Module,
    nets: Lowered,
    region: CompiledRegion,
    search_region: CompiledRegion,
    target: int,
    pre: dict[int, Box],
    confirm: Confirm,
    *,
    config: BabConfig,
    margin: float,
    root_steps: int,
    lr_alpha: float,
    deadline: float,
    generator: torch.Generator,
    progress: Callable[[int, int, float], None] | None = None,
) -> BabOutcome:
    """Show unsafe set ``target`` of ``region`` infeasible, or find a counterexample in it.

    Args:
        model: the eval-mode network in its own dtype (forward passes of candidates, attacks).
        nets: the network lowered in the verifier's dtype (boxes, closing bounds) and in the
            model's (the multiplier ascent and branching), with the exact one's a priori
            rounding errors (refined pre-activation boxes are widened by them).
        region: the compiled region in the verifier's dtype; only the rows of unsafe set
            ``target`` are bounded. ``search_region``: the same in the model's dtype.
        pre: root pre-activation bounds ``(1, *S_i)`` per ReLU op over the region's box,
            valid in exact arithmetic (widened); on a graph per max pooling op too (from
            certified passes). After a split, a chain's later layers are refined by CROWN
            (widened), a graph's by rigorous interval arithmetic from the clamped boxes.
        confirm: float64 re-check of candidates ``(N, *S_in)``; returns a confirmed
            counterexample and its output, or ``None``.
        margin: a subdomain closes when a row's sound lower bound (the dual bound at the
            search's multipliers, its rounding error subtracted) exceeds it.
        root_steps, lr_alpha: alpha optimisation at the root.
        deadline: ``time.monotonic()`` value at which the search gives up (TIMEOUT).
        progress: optional callback ``(bounded subdomains, open subdomains, lowest bound)``.
    """
    net, search = nets.exact, nets.search
    box, search_box = region.box, search_region.box
    mask = region.owner == target
    rows = region.rows[mask].reshape(-1, *net.output_shape)
    offsets = region.offsets[mask]
    search_rows, search_offsets = nets.to_search(rows), nets.to_search(offsets)
    active = torch.zeros(region.n_sets, dtype=torch.bool, device=rows.device)
    active[target] = True
    layers = LayerIndex(net)
    shallow = config.layers_to_split(len(layers.ops), crown_refined=nets.rounding is not None
                                     ) is LayerOrder.SHALLOW_FIRST
    width = config.fsb_width(len(layers.ops))
    signs0 = {i: torch.zeros(pre[i].lower.shape, dtype=torch.int8, device=rows.device)
              for i in layers.ops}

    def bound(pre_d: dict[int, Box], signs: dict[int, Tensor], alphas: dict[int, Tensor] | None,
              betas: dict[int, Tensor] | None, steps: int, lr: float) -> tuple[SplitBound, Tensor]:
        C = rows.unsqueeze(0).expand(pre_d[layers.ops[0]].lower.shape[0], *rows.shape)
        return certified_split_bound(
            net, box, C, pre_d, signs, alphas, betas, search=search, steps=steps,
            lr_alpha=lr, lr_beta=config.lr_beta, deadline=deadline, offsets=offsets,
        )

    def package(pre_d: dict[int, Box], signs: dict[int, Tensor], found: SplitBound,
                lower: Tensor, depth: Tensor, inherited: Tensor | None = None) -> DomainBatch:
        if inherited is not None:
            # A child lies inside its parent, so the parent's bound holds on it too; the
            # child's own can come out lower (its new split enters with a zero multiplier).
            lower = torch.maximum(lower, inherited)
        row = lower.argmax(dim=1)
        scores = branching_scores(nets.search_boxes(pre_d), signs, found.relu_coefficients,
                                  found.alphas, row, layers)
        if shallow:
            scores = shallow_first(scores, layers)
        betas = found.betas if found.betas else {
            i: torch.zeros_like(a) for i, a in found.alphas.items()}
        return DomainBatch(pre=pre_d, signs=signs, alphas=found.alphas, betas=betas,
                           lower=lower, scores=scores, depth=depth)

    def for_search(domains: DomainBatch) -> DomainBatch:
        return replace(domains, pre=nets.search_boxes(domains.pre))

    def check(found: SplitBound, lower: Tensor) -> tuple[Tensor, Tensor] | None:
        candidates = clip_inside(search_region,
                                 minimisers(found, search_box, lower.argmax(dim=1)))
        with torch.no_grad():
            values = violation(search_region, model(candidates), active)
        hits = candidates[values <= 0]
        return confirm(hits) if hits.shape[0] else None

    if not layers.ops:
        return BabOutcome(VerifyStatus.UNKNOWN)
    root, root_lower = bound(pre, signs0, None, None, root_steps, lr_alpha)
    bounded = 1
    domains = package(pre, signs0, root, root_lower,
                      torch.zeros(1, dtype=torch.long, device=rows.device))
    if float(domains.value.max()) > margin:
        return BabOutcome(VerifyStatus.VERIFIED, domains=bounded)
    hit = check(root, domains.lower)
    if hit is not None:
        return BabOutcome(VerifyStatus.FALSIFIED, hit[0], hit[1], domains=bounded)
    queue = DomainQueue()
    queue.push(domains)
    stuck = False
    iteration = 0
    # Deep or wide networks make one batch expensive: the batch is sized from the measured
    # cost per parent so that an iteration takes a small share of the time left.
    batch_size = config.batch_size
    while len(queue):
        if time.monotonic() > deadline:
            return BabOutcome(VerifyStatus.TIMEOUT, domains=bounded)
        iteration += 1
        began = time.monotonic()
        deep = config.order is SearchOrder.DEPTH_FIRST or (
            len(queue) > config.max_domains or queue.nbytes() > QUEUE_BYTES
        )
        parents = queue.pop(batch_size, deepest=deep)
        splittable = torch.isfinite(parents.scores).any(dim=1)
        if not bool(splittable.all()):
            stuck = True
            parents = parents.select(splittable)
            if not len(parents):
                continue
        if config.branching is Branching.FSB:
            flat = fsb_choice(search, search_box, search_rows, search_offsets,
                              for_search(parents), width, layers)
        else:
            flat = parents.scores.argmax(dim=1)
        count = len(parents)
        both = torch.arange(count, device=flat.device).repeat(2)
        children = parents.select(both)
        phase = torch.cat([torch.ones(count, dtype=torch.long, device=flat.device),
                           -torch.ones(count, dtype=torch.long, device=flat.device)])
        pre_c, signs_c = split_at(children, flat.repeat(2), phase, layers)
        if config.refine_intermediate and len(layers.ops) > 1:
            if nets.rounding is None:
                # A graph: the splits reach the boxes after them (max pooling's too) by
                # rigorous interval arithmetic from the clamped boxes.
                pre_c = apply_splits(graph_sound_interval(net, box, int(rows.shape[0]),
                                                          known=pre_c)[0], signs_c)
            else:
                pre_c = widened(nets.rounding, refine_after_splits(
                    net, box, pre_c, signs_c, layers.locate(flat)[0].repeat(2),
                    len(layers.ops)), signs_c)
        empty = empty_subdomains(pre_c)
        found, found_lower = bound(pre_c, signs_c, children.alphas, children.betas,
                                   config.steps, config.lr_alpha)
        bounded += len(children)
        batch = package(pre_c, signs_c, found, found_lower, children.depth + 1, children.lower)
        hit = check(found, batch.lower)
        if hit is not None:
            return BabOutcome(VerifyStatus.FALSIFIED, hit[0], hit[1], domains=bounded)
        open_ = (batch.value <= margin) & ~empty
        queue.push(batch.select(open_))
        per_parent = (time.monotonic() - began) / count
        affordable = int(ITERATION_SHARE * (deadline - time.monotonic()) / max(per_parent, 1e-9))
        batch_size = max(MIN_BATCH, min(config.batch_size, affordable))
        if progress is not None:
            progress(bounded, len(queue), queue.lowest())
        if config.attack_every and iteration % config.attack_every == 0 and len(queue):
            worst = queue.pop(min(len(queue), 8))
            starts = minimisers_of(for_search(worst), search, search_box, search_rows,
                                   search_offsets)
            queue.push(worst)
            candidates = spec_pgd(model, search_region, steps=20, restarts=0,
                                  generator=generator, starts=starts, active=active,
                                  deadline=deadline)
            if candidates.shape[0]:
                hit = confirm(candidates)
                if hit is not None:
                    return BabOutcome(VerifyStatus.FALSIFIED, hit[0], hit[1], domains=bounded)
    if stuck:
        return BabOutcome(VerifyStatus.UNKNOWN, domains=bounded)
    return BabOutcome(VerifyStatus.VERIFIED, domains=bounded)


def refine_after_splits(
    net: Network, box: Box, pre: dict[int, Box], signs: dict[int, Tensor], split_layer: Tensor,
    layer_count: int,
) -> dict[int, Box]:
    """CROWN-refine the layers after each subdomain's newest split (``split_layer: (D,)``
    positions); subdomains split in the last layer need nothing."""
    refined = {i: Box(b.lower.clone(), b.upper.clone()) for i, b in pre.items()}
    for position in range(layer_count - 1):
        chosen = (split_layer == position).nonzero().flatten()
        if chosen.numel() == 0:
            continue
        part = {i: Box(b.lower[chosen], b.upper[chosen]) for i, b in pre.items()}
        part_signs = {i: s[chosen] for i, s in signs.items()}
        with torch.no_grad():
            tightened = refine_pre_activations(net, box, part, part_signs, position)
        for i, b in tightened.items():
            refined[i].lower[chosen] = b.lower
            refined[i].upper[chosen] = b.upper
    return refined


def minimisers_of(
    domains: DomainBatch, net: Network, box: Box, rows: Tensor, offsets: Tensor
) -> Tensor:
    """Minimisers of the linear bounds of ``domains`` (one cheap pass at their multipliers)."""
    from tightrope.bounds import split_lower_bound

    C = rows.unsqueeze(0).expand(len(domains), *rows.shape)
    with torch.no_grad():
        found = split_lower_bound(net, box, C, domains.pre, domains.signs, domains.alphas,
                                  domains.betas)
    return minimisers(found, box, (found.lower - offsets).argmax(dim=1))


def remaining(deadline: float) -> float:
    """Seconds left before ``deadline`` (never negative)."""
    return max(0.0, deadline - time.monotonic()) if math.isfinite(deadline) else math.inf
