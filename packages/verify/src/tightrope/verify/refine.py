"""Tighter pre-activation bounds by branch-and-bound on every unstable neuron of a layer.

On deep networks the bounds of the first layers decide everything after them: on mnistfc
256x6 (VNN-COMP 2021) alpha-CROWN leaves the last three layers almost entirely unstable, with
bounds a hundred times wider than the values the network takes, because the relaxation error of
every unstable ReLU before them compounds. Verifiers tighten such bounds with a MIP solver per
neuron (alpha-beta-CROWN's MIP refinement, after Tjeng et al. 2019). Here the same per-neuron
problem, ``min z_j`` and ``max z_j`` over the input box, is solved approximately by our own
branch-and-bound (beta-CROWN bounds on subdomains, Wang et al. 2021) on the network cut before
the layer:

* every bound of an unstable neuron is its own search (a row ``+e_j`` or ``-e_j``), all of a
  layer's searches run batched together;
* each iteration splits the lowest leaf of every search that has not yet shown its neuron
  stable, on the earlier-layer neuron chosen by filtered smart branching among the best BaBSR
  scores, and bounds both children (split constraints with multipliers, slopes and multipliers
  inherited from the parent);
* a search's bound is the lowest bound over its leaves. The leaves of a search partition the
  input box (both phases of every split are kept; a leaf whose split phases contradict its
  pre-activation bounds holds no point and is dropped), so the bound is sound at any moment and
  is intersected with the bound the neuron had.

Layers are refined shallowest first, each within its share of the time, and each refined layer
makes the searches of the next ones start from tighter bounds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from tightrope.bounds import (
    Box,
    Network,
    SplitBound,
    certified_split_bound,
    empty_subdomains,
    rounding,
)
from tightrope.verify.bab import refine_after_splits
from tightrope.verify.branching import LayerIndex, branching_scores, fsb_choice, split_at
from tightrope.verify.domains import DomainBatch
from tightrope.verify.sound import Lowered, widened

__all__ = ["SplitRefinement", "refine_by_splitting"]

#: Leaves a layer's searches may hold together before that layer stops (memory cap).
MAX_LEAVES = 60_000


class SplitRefinement:
    """What :func:`refine_by_splitting` did: per refined layer position, the unstable neurons
    before and after, and the subdomains bounded in all."""

    def __init__(self) -> None:
        self.unstable: dict[int, tuple[int, int]] = {}
        self.domains = 0


def refine_by_splitting(
    net: Network,
    box: Box,
    pre: Mapping[int, Box],
    positions: Sequence[int],
    deadline: float,
    *,
    nets: Lowered | None = None,
    leaves_per_search: int = 1,
    candidates: int = 16,
    steps: int = 5,
    root_steps: int = 20,
    lr_alpha: float = 0.1,
    lr_beta: float = 0.05,
    report: SplitRefinement | None = None,
) -> dict[int, Box]:
    """Tighten the pre-activation bounds of the ReLU layers at ``positions`` (indices into
    ``net.relu_indices``, refined in increasing order) by per-neuron branch-and-bound.

    Args:
        net: the lowered network.
        box: the input box ``(1, *S_in)`` (one sample).
        pre: sound pre-activation bounds ``(1, *S_i)`` of every ReLU op (e.g. alpha-CROWN's).
        positions: layer positions to refine; position 0 (no ReLU before it, CROWN is exact)
            and positions out of range are skipped.
        deadline: ``time.monotonic()`` value by which all the work ends; the time left is
            shared equally among the layers still to refine.
        leaves_per_search: leaves split per search and iteration (more: larger batches).
        candidates: best-scored neurons each split leaf tries (both children bounded with the
            leaf's multipliers); the one whose worse child is highest is split (filtered smart
            branching, De Palma et al. 2021). ``1``: the best BaBSR score alone. On mnistfc
            256x6 ``prop_12_0.03``'s second ReLU layer, 20 s left 38 of its 46 unstable
            neurons unstable with 1 candidate (4 leaves per search), 35 with 8 and 31 with 16.
        steps: alpha/beta ascent steps on new subdomains; ``root_steps`` on the first bound.
        report: filled in with what was done, when given.
        nets: ``net`` with a lowering in a search dtype and its a priori rounding errors over
            ``box`` (default: ``net`` for both, errors computed here): the searches' multipliers
            are found on the search lowering, the refined pre-activation boxes widened by the
            errors, and every leaf's bound is the sound dual bound in ``net``'s dtype, so the
            result is valid in exact arithmetic.

    Returns:
        Bounds for every ReLU op: those of ``pre`` with the refined layers intersected with
        their searches' bounds. Later layers are *not* recomputed here (callers run
        alpha-CROWN on them with the refined bounds).
    """
    if box.lower.shape[0] != 1:
        raise ValueError(f"refine_by_splitting takes one sample (box batch 1), got {box.shape}")
    if leaves_per_search < 1:
        raise ValueError(f"leaves_per_search must be >= 1, got {leaves_per_search}")
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    nets = Lowered(net, net, rounding(net, box)) if nets is None else nets
    refined = {i: Box(b.lower.detach(), b.upper.detach()) for i, b in pre.items()}
    chosen = sorted({p for p in positions if 0 < p < len(net.relu_indices)})
    for number, position in enumerate(chosen):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        layer_deadline = time.monotonic() + left / (len(chosen) - number)
        index = net.relu_indices[position]
        tightened, domains = _refine_layer(
            nets, box, refined, index, layer_deadline, leaves_per_search=leaves_per_search,
            candidates=candidates, steps=steps, root_steps=root_steps, lr_alpha=lr_alpha,
            lr_beta=lr_beta,
        )
        if report is not None:
            report.unstable[position] = (_unstable(refined[index]), _unstable(tightened))
            report.domains += domains
        refined[index] = tightened
    return refined


def _unstable(bounds: Box) -> int:
    return int(((bounds.lower < 0) & (bounds.upper > 0)).sum())


def _refine_layer(
    nets: Lowered,
    box: Box,
    pre: Mapping[int, Box],
    index: int,
    deadline: float,
    *,
    leaves_per_search: int,
    candidates: int,
    steps: int,
    root_steps: int,
    lr_alpha: float,
    lr_beta: float,
) -> tuple[Box, int]:
    """The bounds of ReLU op ``index``'s pre-activation after its searches, and how many
    subdomains they bounded."""
    net = nets.exact
    current = pre[index]
    lower, upper = current.lower.flatten(), current.upper.flatten()
    neurons = ((lower < 0) & (upper > 0)).nonzero().flatten()
    count = int(neurons.numel())
    if count == 0 or time.monotonic() >= deadline:
        return current, 0
    prefix = Network(ops=net.ops[:index], shapes=net.shapes[: index + 1], like=net.like)
    search = nets.search
    search_prefix = Network(ops=search.ops[:index], shapes=search.shapes[: index + 1],
                            like=search.like)
    search_box = nets.search_box(box)
    layers = LayerIndex(prefix)
    searches = 2 * count
    # Search r < count minimises z_j (a lower bound), search count + r minimises -z_j.
    rows = lower.new_zeros((searches, 1, lower.numel()))
    at = torch.arange(count, device=lower.device)
    rows[at, 0, neurons] = 1.0
    rows[at + count, 0, neurons] = -1.0
    rows = rows.view(searches, 1, *net.shapes[index])

    def package(bounds: dict[int, Box], signs: dict[int, Tensor], found: SplitBound,
                value: Tensor, depth: Tensor, inherited: Tensor | None) -> DomainBatch:
        if inherited is not None:
            value = torch.maximum(value, inherited)  # a child lies inside its parent
        value = value.masked_fill(empty_subdomains(bounds).unsqueeze(1), float("inf"))
        first_row = torch.zeros(value.shape[0], dtype=torch.long, device=value.device)
        scores = branching_scores(nets.search_boxes(bounds), signs, found.relu_coefficients,
                                  found.alphas, first_row, layers)
        betas = found.betas or {i: torch.zeros_like(a) for i, a in found.alphas.items()}
        return DomainBatch(pre=bounds, signs=signs,
                           alphas={i: a.detach() for i, a in found.alphas.items()},
                           betas={i: b.detach() for i, b in betas.items()},
                           lower=value, scores=scores, depth=depth)

    earlier = {i: Box(pre[i].lower.expand(searches, *pre[i].lower.shape[1:]),
                      pre[i].upper.expand(searches, *pre[i].upper.shape[1:]))
               for i in prefix.relu_indices}
    signs0 = {i: torch.zeros(b.lower.shape, dtype=torch.int8, device=lower.device)
              for i, b in earlier.items()}
    with torch.enable_grad():
        root, root_value = certified_split_bound(
            prefix, box, rows, earlier, signs0, search=search_prefix, steps=root_steps,
            lr_alpha=lr_alpha, lr_beta=lr_beta, deadline=deadline)
    leaves = package(earlier, signs0, root, root_value,
                     torch.zeros(searches, dtype=torch.long, device=lower.device), None)
    owner = torch.arange(searches, device=lower.device)
    bounded = searches
    while time.monotonic() < deadline and len(leaves) < MAX_LEAVES:
        best = _search_bounds(leaves, owner, searches)
        # A neuron is settled once either of its searches shows it stable.
        settled = (best[:count] >= 0) | (best[count:] >= 0)
        live = ~torch.cat([settled, settled])
        value = leaves.lower[:, 0]
        eligible = live[owner] & torch.isfinite(leaves.scores).any(dim=1) & torch.isfinite(value)
        if not bool(eligible.any()):
            break
        parents_at = _lowest_per_search(torch.where(eligible, value, torch.inf), owner,
                                        searches, leaves_per_search)
        parents = leaves.select(parents_at)
        parent_owner = owner[parents_at]
        keep = torch.ones(len(leaves), dtype=torch.bool, device=value.device)
        keep[parents_at] = False
        leaves, owner = leaves.select(keep), owner[keep]

        if candidates > 1:
            # Filtered smart branching on each parent's own objective row.
            flat = fsb_choice(search_prefix, search_box, nets.to_search(rows[parent_owner]),
                              None, replace(parents, pre=nets.search_boxes(parents.pre)),
                              candidates, layers)
        else:
            flat = parents.scores.argmax(dim=1)
        both = torch.arange(len(parents), device=flat.device).repeat(2)
        children = parents.select(both)
        phase = torch.cat([torch.ones_like(flat), -torch.ones_like(flat)])
        bounds_c, signs_c = split_at(children, flat.repeat(2), phase, layers)
        if len(layers.ops) > 1:
            bounds_c = widened(nets.rounding, refine_after_splits(
                prefix, box, bounds_c, signs_c, layers.locate(flat)[0].repeat(2),
                len(layers.ops)), signs_c)
        with torch.enable_grad():
            found, found_value = certified_split_bound(
                prefix, box, rows[parent_owner.repeat(2)], bounds_c, signs_c, children.alphas,
                children.betas, search=search_prefix, steps=steps, lr_alpha=lr_alpha,
                lr_beta=lr_beta, deadline=deadline,
            )
        batch = package(bounds_c, signs_c, found, found_value, children.depth + 1,
                        children.lower)
        bounded += len(batch)
        # Empty children (+inf) hold no point; a child whose bound is -inf (NaN or overflow in
        # its bound) stays, and keeps its search's bound at -inf.
        kept = batch.lower[:, 0] != float("inf")
        leaves = DomainBatch.cat([leaves, batch.select(kept)])
        owner = torch.cat([owner, parent_owner.repeat(2)[kept]])

    best = _search_bounds(leaves, owner, searches)
    new_lower, new_upper = lower.clone(), upper.clone()
    new_lower[neurons] = torch.maximum(lower[neurons], best[:count])
    new_upper[neurons] = torch.minimum(upper[neurons], -best[count:])
    # Crossed bounds would mean an empty box; keep the old ones there rather than rely on it.
    crossed = new_lower > new_upper
    new_lower = torch.where(crossed, lower, new_lower)
    new_upper = torch.where(crossed, upper, new_upper)
    shape = current.lower.shape
    return Box(new_lower.view(shape), new_upper.view(shape)), bounded


def _search_bounds(leaves: DomainBatch, owner: Tensor, searches: int) -> Tensor:
    """``(searches,)``: each search's lowest leaf bound (``inf`` when all its leaves are
    empty)."""
    value = leaves.lower[:, 0]
    return value.new_full((searches,), float("inf")).scatter_reduce(
        0, owner, value, reduce="amin")


def _lowest_per_search(value: Tensor, owner: Tensor, searches: int, per_search: int) -> Tensor:
    """Indices of up to ``per_search`` leaves of lowest finite ``value`` in every search."""
    order = torch.argsort(value)
    ranked = owner[order]
    grouped = torch.argsort(ranked, stable=True)  # by search, lowest value first
    counts = torch.bincount(ranked, minlength=searches)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(grouped)
    rank[grouped] = torch.arange(grouped.numel(), device=value.device) - starts[ranked[grouped]]
    picked = order[(rank < per_search) & torch.isfinite(value[order])]
    return picked
