"""What lets a stage close anything: bounds computed in the verifier's dtype, pre-activation
boxes widened by their a priori rounding error, and closing values with their own rigorous
rounding error subtracted.

Every comparison that closes a sample, an unsafe set or a subdomain reads a value from
:func:`closing_bounds` or :func:`tightrope.bounds.sound_interval` (``-inf`` for NaN or
overflow, so nothing non-finite proves anything); every pre-activation box a relaxation is built
on passes through :func:`widened` first (see :mod:`tightrope.bounds.rounding`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from tightrope.bounds import Box, Network, Rounding, SplitBound, apply_splits, dual_lower

__all__ = ["bound_copy", "closing_bounds", "widened"]


def bound_copy(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """``model`` in ``dtype`` (a copy in eval mode), or itself when ``dtype`` is ``None`` or
    already its dtype."""
    reference = next((t for t in [*model.parameters(), *model.buffers()]
                      if t.is_floating_point()), None)
    if dtype is None or reference is None or reference.dtype == dtype:
        return model
    return copy.deepcopy(model).to(dtype).eval()


def widened(rounding: Rounding, boxes: Mapping[int, Box],
            signs: Mapping[int, Tensor] | None = None) -> dict[int, Box]:
    """Computed pre-activation ``boxes`` widened by their a priori rounding error, then clamped
    to the split phases ``signs`` (exact constraints of a subdomain)."""
    wide = {i: rounding.widen(i, b) for i, b in boxes.items()}
    return apply_splits(wide, signs) if signs else wide


def closing_bounds(net: Network, box: Box, C: Tensor, boxes: Mapping[int, Box],
                   found: SplitBound, offsets: Tensor | None = None) -> Tensor:
    """``(D, K)`` sound lower bounds of ``C f(x) - offsets``: the dual bound at the multipliers
    of ``found`` (computed over the same ``box``, ``C`` and widened ``boxes``)."""
    return dual_lower(net, box, C, boxes, found.pre_coefficients, offsets)
