"""What lets a stage close anything: pre-activation boxes computed in the verifier's dtype
(float64 by default) and widened by their a priori rounding error, and closing values with
their own rigorous rounding error subtracted. The searches for good multipliers (slope and
split-multiplier ascent, branching, attacks) run on the model in its own dtype, where they
are fast; only their results are evaluated in the verifier's dtype.

Every comparison that closes a sample, an unsafe set or a subdomain reads a value from
:func:`tightrope.bounds.certified_split_bound` or :func:`tightrope.bounds.sound_interval`
(``-inf`` for NaN or overflow, so nothing non-finite proves anything); every pre-activation
box a relaxation is built on is widened (:func:`widened`, :mod:`tightrope.bounds.rounding`) or
comes from those rigorous evaluations.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tightrope.bounds import (
    Box,
    Network,
    Rounding,
    apply_splits,
    lower,
    rounding,
)

__all__ = ["Lowered", "bound_copy", "check_finite", "lowered", "reference", "widened"]


@dataclass(frozen=True, slots=True)
class Lowered:
    """One region's network twice, and the a priori rounding errors of the exact one.

    Attributes:
        exact: in the verifier's dtype: pre-activation boxes and every closing bound.
        search: in the model's own dtype (the same object when they agree): the ascent of
            slopes and multipliers, branching, attacks.
        rounding: :func:`tightrope.bounds.rounding` of ``exact`` over the region's box;
            ``None`` for a graph (not a chain of affine maps and ReLUs), whose boxes come
            from certified passes only
            (:func:`~tightrope.bounds.graph_certificate.graph_certified_root`), never widened.
    """

    exact: Network
    search: Network
    rounding: Rounding | None

    @property
    def is_graph(self) -> bool:
        """Whether the network is not a chain of affine maps and ReLUs."""
        return self.rounding is None

    def to_search(self, tensor: Tensor) -> Tensor:
        """``tensor`` in the search dtype (unchanged when it already is)."""
        return tensor.to(self.search.like.dtype)

    def search_box(self, box: Box) -> Box:
        return Box(self.to_search(box.lower), self.to_search(box.upper))

    def search_boxes(self, boxes: Mapping[int, Box]) -> dict[int, Box]:
        """Pre-activation boxes in the search dtype (for heuristics only: casting may round
        them inwards)."""
        return {i: self.search_box(b) for i, b in boxes.items()}


def lowered(exact_model: nn.Module, search_model: nn.Module, box: Box, rows: int,
            exact: Network | None = None) -> Lowered:
    """Both lowerings of a model over ``box`` (in ``exact_model``'s dtype), ``(1, *S_in)``;
    ``exact``: ``exact_model`` already lowered over ``box``."""
    if exact is None:
        exact = lower(exact_model, box.center)
    if exact_model is search_model:
        search = exact
    else:
        search = lower(search_model, box.center.to(reference(search_model).dtype))
    if not exact.is_relu_chain:
        return Lowered(exact, search, None)
    return Lowered(exact, search, rounding(exact, box, rows=rows))


def check_finite(model: nn.Module) -> None:
    """Raise ``ValueError`` naming every parameter or buffer of ``model`` that holds NaN or an
    infinity: no bound over such a network means anything."""
    bad = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise ValueError(f"the model has non-finite values (NaN or inf) in {', '.join(bad)}; "
                         "a network with such weights cannot be verified: fix or retrain it")


def reference(model: nn.Module) -> Tensor:
    """The first floating-point parameter or buffer of ``model``: its dtype and device."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            return tensor
    raise TypeError("verify needs a model with floating-point parameters (its dtype and device)")


def bound_copy(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """``model`` in ``dtype`` (a copy in eval mode), or itself when ``dtype`` is ``None`` or
    already its dtype."""
    if dtype is None or reference(model).dtype == dtype:
        return model
    return copy.deepcopy(model).to(dtype).eval()


def widened(rounding: Rounding | None, boxes: Mapping[int, Box],
            signs: Mapping[int, Tensor] | None = None) -> dict[int, Box]:
    """Computed pre-activation ``boxes`` widened by their a priori rounding error, then clamped
    to the split phases ``signs`` (exact constraints of a subdomain). ``rounding`` ``None``
    (a graph's :class:`Lowered`) is refused: a graph has no a priori error bound, so its
    boxes must come from certified passes."""
    if rounding is None:
        raise ValueError("a graph network's boxes cannot be widened (no a priori rounding "
                         "error); compute them with tightrope.bounds.graph_certificate")
    wide = {i: rounding.widen(i, b) for i, b in boxes.items()}
    return apply_splits(wide, signs) if signs else wide
