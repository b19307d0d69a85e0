"""A specification compiled to tensors the verifier's stages share.

Every unsafe set ``A y <= b`` of a region contributes its rows to one row matrix; the value of
row ``r`` at output ``y`` is ``A_r y - b_r`` and an unsafe set is *excluded* from a part of the
input space as soon as one of its rows has a positive lower bound there (the conjunction is
then infeasible). A point is a counterexample when every row of some unsafe set is ``<= 0``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tightrope.bounds import Box
from tightrope.verify.spec import Region, Specification

__all__ = [
    "CompiledRegion",
    "clip_inside",
    "compile_region",
    "confirm",
    "float64_model",
    "rounded_box",
    "set_values",
    "violation",
]


@dataclass(frozen=True, slots=True)
class CompiledRegion:
    """One region in the model's dtype and device.

    Attributes:
        box: the input box ``(1, *S_in)``, rounded outwards to the model's dtype (bounds over
            it cover the specification's box).
        inner: the same box rounded inwards (every point of it lies in the specification's
            box): attacks and counterexample candidates stay in it.
        rows: ``(R, n_out)`` every unsafe set's rows, stacked.
        offsets: ``(R,)`` their right-hand sides ``b``.
        owner: ``(R,)`` index of the unsafe set of each row.
        n_sets: number of unsafe sets.
    """

    box: Box
    inner: Box
    rows: Tensor
    offsets: Tensor
    owner: Tensor
    n_sets: int

    def rows_of(self, sets: Tensor) -> Tensor:
        """``(R,)`` booleans: the rows belonging to the unsafe sets flagged in ``sets: (U,)``."""
        return sets[self.owner]


def compile_region(region: Region, like: Tensor) -> CompiledRegion:
    """Stack ``region``'s unsafe sets in the dtype and device of ``like``."""
    rows, offsets, owner = [], [], []
    for number, unsafe in enumerate(region.unsafe):
        rows.append(unsafe.A.to(like))
        offsets.append(unsafe.b.to(like))
        owner.append(torch.full((unsafe.A.shape[0],), number, dtype=torch.long))
    outer, inner = rounded_box(region.box, like)
    return CompiledRegion(
        box=outer,
        inner=inner,
        rows=torch.cat(rows),
        offsets=torch.cat(offsets),
        owner=torch.cat(owner).to(like.device),
        n_sets=len(region.unsafe),
    )


def rounded_box(box: Box, like: Tensor) -> tuple[Box, Box]:
    """``box`` in the dtype and device of ``like``, rounded outwards (it contains ``box``) and
    inwards (``box`` contains it); both are ``box`` itself when no precision is lost."""
    lower, upper = box.lower, box.upper
    low, high = lower.to(like), upper.to(like)
    wide = lower.dtype.is_floating_point and torch.finfo(like.dtype).bits < torch.finfo(
        lower.dtype).bits
    if not wide:
        return Box(low, high), Box(low, high)
    down = torch.full_like(low, float("-inf"))
    up = torch.full_like(low, float("inf"))
    outer = Box(torch.where(low.to(lower) > lower, torch.nextafter(low, down), low),
                torch.where(high.to(upper) < upper, torch.nextafter(high, up), high))
    inner = Box(torch.where(low.to(lower) < lower, torch.nextafter(low, up), low),
                torch.where(high.to(upper) > upper, torch.nextafter(high, down), high))
    return outer, inner


def clip_inside(region: CompiledRegion, points: Tensor) -> Tensor:
    """``points: (N, *S_in)`` clamped into the region's inward-rounded box."""
    return torch.minimum(torch.maximum(points, region.inner.lower), region.inner.upper)


def set_values(region: CompiledRegion, outputs: Tensor, active: Tensor | None = None) -> Tensor:
    """``(N, U)``: per unsafe set, the largest row value ``max_r (A_r y - b_r)`` at each output.

    A set's value is ``<= 0`` exactly when the output lies in it. Sets not flagged in
    ``active: (U,)`` get ``+inf``.
    """
    values = outputs.flatten(1) @ region.rows.T - region.offsets
    per_set = values.new_full((values.shape[0], region.n_sets), float("-inf"))
    per_set = per_set.scatter_reduce(
        1, region.owner.expand_as(values), values, reduce="amax", include_self=True
    )
    if active is not None:
        per_set = torch.where(active, per_set, torch.full_like(per_set, float("inf")))
    return per_set


def violation(region: CompiledRegion, outputs: Tensor, active: Tensor | None = None) -> Tensor:
    """``(N,)``: ``min`` over (active) unsafe sets of :func:`set_values`; ``<= 0`` is unsafe."""
    return set_values(region, outputs, active).min(dim=1).values


def float64_model(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` in eval mode, for re-checking counterexamples."""
    return copy.deepcopy(model).to(torch.float64).eval()


def confirm(
    spec: Specification, model64: nn.Module, candidates: Tensor
) -> tuple[Tensor, Tensor] | None:
    """The first of ``candidates: (N, *S_in)`` that the float64 forward pass confirms as a
    counterexample of ``spec`` (inside a region's box, output in one of its unsafe sets), with
    its ``(1, n_out)`` float64 output; ``None`` if none does."""
    with torch.no_grad():
        device = next(iter(model64.parameters()), torch.empty(0)).device
        outputs = model64(candidates.to(device=device, dtype=torch.float64))
    for index in range(candidates.shape[0]):
        x = candidates[index : index + 1]
        y = outputs[index : index + 1].flatten(1)
        if spec.violated_by(x, y):
            return x, y
    return None
