"""Specifications and answers: what a verifier is asked and what it may say.

A :class:`Specification` is a set of input regions, each with a *disjunction* of unsafe output
sets (the VNN-COMP convention: the VNNLIB file describes the counterexample). Each unsafe set is a
conjunction ``A y <= b`` of linear constraints on the network output ``y``. The property holds
(VNN-COMP ``unsat``) when no input of any region maps into any unsafe set.

l_inf robustness of a classifier at ``(x, label)`` is the special case of one region
(``Box.from_linf(x, eps)``) and one unsafe set per other class ``j`` with the single row
``(e_label - e_j) y <= 0``; see :func:`robustness_spec`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tightrope.bounds import Box

__all__ = [
    "Region",
    "Specification",
    "UnsafeSet",
    "VerifyStatus",
    "linf_box",
    "robustness_spec",
]


class VerifyStatus(enum.Enum):
    """A verifier's answer.

    ``VERIFIED`` comes only from a sound bound; ``FALSIFIED`` only with a concrete input whose
    plain forward pass violates the property; otherwise ``UNKNOWN`` (the method gave up) or
    ``TIMEOUT`` (the time budget ran out).
    """

    VERIFIED = "verified"
    FALSIFIED = "falsified"
    UNKNOWN = "unknown"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class UnsafeSet:
    """The conjunction ``A y <= b`` over the output ``y``: ``A: (m, n_out)``, ``b: (m,)``."""

    A: Tensor
    b: Tensor

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.b.dim() != 1 or self.A.shape[0] != self.b.shape[0]:
            raise ValueError(
                f"UnsafeSet needs A: (m, n_out) and b: (m,), got A {tuple(self.A.shape)} "
                f"and b {tuple(self.b.shape)}"
            )

    def contains(self, y: Tensor) -> Tensor:
        """``(N,)`` booleans: which rows of ``y: (N, n_out)`` satisfy every constraint."""
        values = y.to(self.A.dtype) @ self.A.T
        return (values <= self.b).all(dim=-1)


@dataclass(frozen=True, slots=True)
class Region:
    """One input box (``lower``/``upper`` of shape ``(1, *S)``) and its unsafe output sets."""

    box: Box
    unsafe: tuple[UnsafeSet, ...]

    def __post_init__(self) -> None:
        if self.box.shape[0] != 1:
            raise ValueError(f"a Region holds one box (batch 1), got {tuple(self.box.shape)}")
        if not self.unsafe:
            raise ValueError("a Region needs at least one unsafe set")
        if bool((self.box.lower > self.box.upper).any()):
            raise ValueError("a Region's box has lower > upper somewhere: it is empty")


@dataclass(frozen=True, slots=True)
class Specification:
    """The property holds iff it holds on every region."""

    regions: tuple[Region, ...]

    def __post_init__(self) -> None:
        if not self.regions:
            raise ValueError("a Specification needs at least one region")

    def violated_by(self, x: Tensor, y: Tensor) -> bool:
        """Whether input ``x: (1, *S)`` with output ``y: (1, n_out)`` is a counterexample.

        ``x`` must lie in some region's box and ``y`` in one of that region's unsafe sets.
        """
        for region in self.regions:
            inside = bool(region.box.contains(x.to(region.box.lower.dtype)).all())
            if inside and any(bool(u.contains(y).any()) for u in region.unsafe):
                return True
        return False


def linf_box(x: Tensor, eps: float) -> Box:
    """The l_inf ball of radius ``eps`` around ``x: (N, *S)`` intersected with ``[0, 1]``, in
    float64 and rounded outwards: it contains every real point within ``eps`` of ``x``."""
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    center = x.detach().to(torch.float64)
    lower = torch.nextafter(center - eps, torch.full_like(center, -math.inf))
    upper = torch.nextafter(center + eps, torch.full_like(center, math.inf))
    return Box(lower.clamp(0.0, 1.0), upper.clamp(0.0, 1.0))


def robustness_spec(x: Tensor, label: int, eps: float, num_classes: int) -> Specification:
    """l_inf robustness of ``x: (1, *S)`` in ``[0, 1]`` with radius ``eps`` around ``label``
    (the box of :func:`linf_box`)."""
    if not 0 <= label < num_classes:
        raise ValueError(f"label must be in [0, {num_classes}), got {label}")
    eye = torch.eye(num_classes, dtype=x.dtype, device=x.device)
    unsafe = tuple(
        UnsafeSet(A=(eye[label] - eye[j]).unsqueeze(0), b=torch.zeros(1, dtype=x.dtype))
        for j in range(num_classes)
        if j != label
    )
    return Specification((Region(linf_box(x, eps), unsafe),))
