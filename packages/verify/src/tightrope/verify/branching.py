"""Which ReLU to split: BaBSR-style scores and filtered smart branching (FSB).

* Scores (after BaBSR, Bunel et al. 2020, "Branch and Bound for Piecewise Linear Neural
  Network Verification"): the backward pass of a subdomain's bound meets neuron ``j`` with
  coefficient ``a_j`` on its ReLU output. With a negative coefficient the bound pays
  ``a_j t_j`` for the upper line's intercept ``t_j = -u_j l_j / (u_j - l_j)``; with a positive one
  it loses at most ``a_j max((1 - alpha_j) u_j, -alpha_j l_j)`` to the lower line. Splitting makes
  the neuron exact and recovers that loss, so the score is the loss.
* FSB (De Palma et al. 2021, "Improved Branch and Bound for Neural Network Verification via
  Lagrangian Decomposition"): the top-scoring candidates of each subdomain are each split and
  both children bounded with the parent's multipliers in one batched pass; the candidate whose
  worse child is best is chosen.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from tightrope.bounds import Box, Network, empty_subdomains, split_lower_bound
from tightrope.verify.domains import DomainBatch

__all__ = ["LayerIndex", "branching_scores", "fsb_choice", "shallow_first", "split_at"]


class LayerIndex:
    """Maps flat neuron numbers (all ReLU layers, flattened, in order) to (op index, neuron)."""

    def __init__(self, net: Network) -> None:
        self.ops = net.relu_indices
        sizes = [int(torch.Size(net.shapes[i]).numel()) for i in self.ops]
        self.starts = torch.tensor([0, *sizes[:-1]]).cumsum(0)
        self.sizes = sizes
        self.total = sum(sizes)
        #: ``(N,)``: the layer position of every flat neuron.
        self.layer_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))

    def locate(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """``(layer position, neuron within the layer)`` of flat indices ``flat: (N,)``."""
        layer = self.layer_of.to(flat.device)[flat]
        return layer, flat - self.starts.to(flat.device)[layer]


def branching_scores(
    pre: Mapping[int, Box],
    signs: Mapping[int, Tensor],
    relu_coefficients: Mapping[int, Tensor],
    alphas: Mapping[int, Tensor],
    row: Tensor,
    layers: LayerIndex,
) -> Tensor:
    """``(D, N)`` scores of every neuron (``-inf`` where it is stable or split).

    Args:
        pre: clamped pre-activation bounds ``(D, *S_i)``.
        signs: split phases ``(D, *S_i)``.
        relu_coefficients: ``(D, K, *S_i)`` coefficients of the ReLU outputs in the bound.
        alphas: ``(D, K, *S_i)`` lower slopes used by the bound.
        row: ``(D,)`` the specification row each subdomain's verdict rests on.
    """
    parts = []
    for index in layers.ops:
        box = pre[index]
        lower, upper = box.lower.flatten(1), box.upper.flatten(1)
        pick = row.view(-1, 1, *([1] * (relu_coefficients[index].dim() - 2)))
        pick = pick.expand(-1, 1, *relu_coefficients[index].shape[2:])
        coefficient = relu_coefficients[index].gather(1, pick).flatten(1)
        alpha = alphas[index].expand_as(relu_coefficients[index]).gather(1, pick).flatten(1)
        unstable = (lower < 0) & (upper > 0) & (signs[index].flatten(1) == 0)
        width = torch.where(unstable, upper - lower, torch.ones_like(upper))
        intercept = torch.where(unstable, -upper * lower / width, torch.zeros_like(upper))
        gap = torch.maximum((1 - alpha) * upper, -alpha * lower)
        score = (-coefficient).clamp(min=0) * intercept + coefficient.clamp(min=0) * gap
        # A tiny width term breaks ties among neurons the bound does not see yet.
        score = score + 1e-6 * width
        parts.append(torch.where(unstable, score, torch.full_like(score, float("-inf"))))
    return torch.cat(parts, dim=1)


def shallow_first(scores: Tensor, layers: LayerIndex) -> Tensor:
    """``scores`` (``(D, N)``, ``-inf`` where a neuron cannot be split) with every neuron
    outside each subdomain's shallowest ReLU layer that still has a splittable neuron set to
    ``-inf`` (see :class:`~tightrope.verify.config.LayerOrder`)."""
    if len(layers.ops) < 2:
        return scores
    layer_of = layers.layer_of.to(scores.device)
    per_layer = torch.zeros((scores.shape[0], len(layers.ops)), dtype=scores.dtype,
                            device=scores.device)
    per_layer.index_add_(1, layer_of, torch.isfinite(scores).to(scores.dtype))
    # The shallowest layer with a splittable neuron (0 where there is none: nothing changes).
    first = (per_layer > 0).to(torch.int8).argmax(dim=1, keepdim=True)
    return scores.masked_fill(layer_of != first, float("-inf"))


def split_at(
    domains: DomainBatch, flat: Tensor, phase: Tensor, layers: LayerIndex
) -> tuple[dict[int, Box], dict[int, Tensor]]:
    """Clamped bounds and signs of ``domains`` with neuron ``flat: (D,)`` fixed to ``phase: (D,)``
    (``+1`` active, ``-1`` inactive); boxes of other relaxed ops are passed on as they are."""
    layer, neuron = layers.locate(flat)
    pre: dict[int, Box] = dict(domains.pre)  # max pooling boxes (on graphs) pass unchanged
    signs: dict[int, Tensor] = {}
    rows = torch.arange(len(domains), device=flat.device)
    for position, index in enumerate(layers.ops):
        here = layer == position
        box, sign = domains.pre[index], domains.signs[index]
        if not bool(here.any()):
            pre[index], signs[index] = box, sign
            continue
        shape = sign.shape
        sign = sign.flatten(1).clone()
        lower, upper = box.lower.flatten(1).clone(), box.upper.flatten(1).clone()
        r, n, p = rows[here], neuron[here], phase[here]
        sign[r, n] = p.to(sign.dtype)
        lower[r, n] = torch.where(p > 0, lower[r, n].clamp(min=0), lower[r, n])
        upper[r, n] = torch.where(p < 0, upper[r, n].clamp(max=0), upper[r, n])
        signs[index] = sign.view(shape)
        pre[index] = Box(lower.view(shape), upper.view(shape))
    return pre, signs


#: Bytes the children of one FSB evaluation pass may hold (bounds, signs and coefficients);
#: larger batches of parents are evaluated in chunks.
FSB_CHUNK_BYTES = 256 << 20


def fsb_choice(
    net: Network,
    box: Box,
    rows: Tensor,
    offsets: Tensor | None,
    domains: DomainBatch,
    candidates: int,
    layers: LayerIndex,
) -> Tensor:
    """``(D,)`` flat neuron per subdomain chosen by filtered smart branching.

    Args:
        box: the input box ``(1, *S_in)``.
        rows: ``(K, *S_out)`` specification rows shared by every subdomain, or
            ``(D, K, *S_out)``, each subdomain's own.
        offsets: ``(K,)`` thresholds subtracted from the rows' bounds (None: zero); a child's
            value is the largest row bound minus offset, as in the search.
        domains: the parents, with their scores and multipliers.
        candidates: how many top-scoring neurons each parent tries; each costs two children
            bounded in one batched pass, in chunks of parents whose children stay under
            ``FSB_CHUNK_BYTES``.
    """
    count = len(domains)
    k = min(candidates, domains.scores.shape[1])
    top = torch.topk(domains.scores, k, dim=1)
    if k == 1:
        return top.indices[:, 0]
    shared = rows.dim() == len(net.output_shape) + 1
    # Per child: pre-activation bounds, signs, slopes and multipliers of every ReLU neuron
    # (per row where they carry one) and the backward pass's coefficients.
    element = domains.scores.element_size()
    per_child = layers.total * element * (3 + 3 * rows.shape[-1 - len(net.output_shape)]) + 1
    chunk = max(1, FSB_CHUNK_BYTES // (2 * k * per_child))
    worse_child = torch.cat([
        _worse_children(net, box, rows if shared else rows[start:start + chunk], offsets,
                        domains.select(torch.arange(start, min(start + chunk, count),
                                                    device=top.indices.device)),
                        top.indices[start:start + chunk], layers)
        for start in range(0, count, chunk)
    ])
    # Candidates that were not splittable (score -inf) must never win.
    worse_child = torch.where(torch.isinf(top.values) & (top.values < 0),
                              torch.full_like(worse_child, float("-inf")), worse_child)
    best = worse_child.argmax(dim=1)
    return top.indices.gather(1, best.unsqueeze(1)).squeeze(1)


def _worse_children(
    net: Network, box: Box, rows: Tensor, offsets: Tensor | None, domains: DomainBatch,
    choices: Tensor, layers: LayerIndex,
) -> Tensor:
    """``(D, k)``: for each parent and candidate neuron ``choices: (D, k)``, the lower of its two
    children's values (with the parent's multipliers; ``inf`` for an empty child); ``rows`` as
    in :func:`fsb_choice`, per parent for these ``D`` parents."""
    count, k = choices.shape
    # Children ordered (parent, candidate, phase).
    flat = choices.repeat_interleave(2, dim=1).flatten()
    phase = torch.tensor([1, -1], device=flat.device).repeat(count * k)
    parent = torch.arange(count, device=flat.device).repeat_interleave(2 * k)
    repeated = domains.select(parent)
    pre, signs = split_at(repeated, flat, phase, layers)
    if rows.dim() == len(net.output_shape) + 1:
        C = rows.unsqueeze(0).expand(len(repeated), *rows.shape)
    else:
        C = rows[parent]
    with torch.no_grad():
        found = split_lower_bound(
            net, box, C, pre, signs, repeated.alphas, repeated.betas
        )
    lower = found.lower if offsets is None else found.lower - offsets
    value = lower.max(dim=1).values
    value = torch.where(empty_subdomains(pre), torch.full_like(value, float("inf")), value)
    return value.view(count, k, 2).min(dim=2).values
