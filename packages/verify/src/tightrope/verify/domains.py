"""Branch-and-bound subdomains, stored as batches of tensors, and the queue that holds them.

A ReLU subdomain is the input box plus a set of fixed ReLU phases (``signs``), the
pre-activation bounds valid on it (already clamped to the phases), the multipliers of its last
bound (``alphas``, ``betas``: the children start from them) and the branching scores read from
that bound. Everything is stacked along a leading domain dimension ``D`` so one bound call
handles a whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tightrope.bounds import Box

__all__ = ["DomainBatch", "DomainQueue"]


@dataclass(frozen=True, slots=True)
class DomainBatch:
    """``D`` ReLU subdomains.

    Attributes:
        pre: per ReLU op, pre-activation bounds ``(D, *S_i)`` clamped to the splits.
        signs: per ReLU op, ``(D, *S_i)`` int8 split phases in ``{-1, 0, 1}``.
        alphas, betas: per ReLU op, ``(D, K, *S_i)`` multipliers of the last bound.
        lower: ``(D, K)`` lower bounds of the rows ``A_r f(x) - b_r``.
        scores: ``(D, N)`` branching scores over all ReLU neurons (flattened, layer by layer);
            ``-inf`` where a neuron cannot be split.
        depth: ``(D,)`` number of splits.
    """

    pre: dict[int, Box]
    signs: dict[int, Tensor]
    alphas: dict[int, Tensor]
    betas: dict[int, Tensor]
    lower: Tensor
    scores: Tensor
    depth: Tensor

    def __len__(self) -> int:
        return int(self.lower.shape[0])

    @property
    def value(self) -> Tensor:
        """``(D,)``: the best row bound; the subdomain is safe when it is positive."""
        return self.lower.max(dim=1).values

    def select(self, index: Tensor) -> DomainBatch:
        """The subdomains at ``index`` (a long index or a boolean mask over ``D``)."""
        return DomainBatch(
            pre={i: Box(b.lower[index], b.upper[index]) for i, b in self.pre.items()},
            signs={i: s[index] for i, s in self.signs.items()},
            alphas={i: a[index] for i, a in self.alphas.items()},
            betas={i: b[index] for i, b in self.betas.items()},
            lower=self.lower[index],
            scores=self.scores[index],
            depth=self.depth[index],
        )

    @staticmethod
    def cat(batches: Sequence[DomainBatch]) -> DomainBatch:
        """One batch holding every subdomain of ``batches`` (all with the same layers)."""
        if len(batches) == 1:
            return batches[0]
        first = batches[0]
        return DomainBatch(
            pre={
                i: Box(
                    torch.cat([b.pre[i].lower for b in batches]),
                    torch.cat([b.pre[i].upper for b in batches]),
                )
                for i in first.pre
            },
            signs={i: torch.cat([b.signs[i] for b in batches]) for i in first.signs},
            alphas={i: torch.cat([b.alphas[i] for b in batches]) for i in first.alphas},
            betas={i: torch.cat([b.betas[i] for b in batches]) for i in first.betas},
            lower=torch.cat([b.lower for b in batches]),
            scores=torch.cat([b.scores for b in batches]),
            depth=torch.cat([b.depth for b in batches]),
        )

    def nbytes(self) -> int:
        """Memory held by this batch's tensors."""
        tensors = [self.lower, self.scores, self.depth]
        tensors += [b.lower for b in self.pre.values()] + [b.upper for b in self.pre.values()]
        tensors += [*self.signs.values(), *self.alphas.values(), *self.betas.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


class DomainQueue:
    """Open subdomains, kept as a few batches; pops the lowest bounds or the deepest ones."""

    #: Batches are merged into one when there are more than this many.
    MAX_CHUNKS = 16

    def __init__(self) -> None:
        self._chunks: list[DomainBatch] = []

    def __len__(self) -> int:
        return sum(len(c) for c in self._chunks)

    def push(self, batch: DomainBatch) -> None:
        """Add ``batch`` (ignored when empty)."""
        if len(batch):
            self._chunks.append(batch)
        if len(self._chunks) > self.MAX_CHUNKS:
            self._chunks = [DomainBatch.cat(self._chunks)]

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self._chunks)

    def lowest(self) -> float:
        """The lowest subdomain value in the queue (``inf`` when empty)."""
        if not self._chunks:
            return float("inf")
        return float(min(float(c.value.min()) for c in self._chunks))

    def pop(self, count: int, *, deepest: bool = False) -> DomainBatch:
        """Remove and return up to ``count`` subdomains: the lowest values, or the deepest."""
        if not self._chunks:
            raise IndexError("pop from an empty DomainQueue")
        keys = torch.cat([(-c.depth.to(c.lower.dtype)) if deepest else c.value
                          for c in self._chunks])
        if keys.numel() <= count:
            batch = DomainBatch.cat(self._chunks)
            self._chunks = []
            return batch
        chosen = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
        chosen[torch.topk(keys, count, largest=False).indices] = True
        taken, kept = [], []
        begin = 0
        for chunk in self._chunks:
            mask = chosen[begin : begin + len(chunk)]
            begin += len(chunk)
            if not bool(mask.any()):
                kept.append(chunk)
                continue
            taken.append(chunk.select(mask))
            if not bool(mask.all()):
                kept.append(chunk.select(~mask))
        self._chunks = kept
        return DomainBatch.cat(taken)
