"""``Mode.MILP``: an exact answer from the mixed-integer program (Tjeng et al. 2019).

Every row of every unsafe set is minimised exactly over its region with HiGHS
(:func:`tightrope.bounds.milp_minimum`). An unsafe set is excluded when some row's proven lower
bound exceeds the margin; a row minimiser that satisfies the whole unsafe set (re-checked in
float64) is a counterexample. A set of several rows whose every row can reach ``<= 0`` but not
at one common point stays undecided (``UNKNOWN``): the per-row programs do not capture the
conjunction. Small networks only (the MILP has a binary per unstable ReLU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from tightrope.bounds import milp_minimum
from tightrope.verify.problem import CompiledRegion, clip_inside
from tightrope.verify.spec import Specification, VerifyStatus

__all__ = ["milp_verify"]


def milp_verify(
    model: nn.Module,
    spec: Specification,
    regions: Sequence[CompiledRegion],
    confirm: Callable[[Tensor], tuple[Tensor, Tensor] | None],
    deadline: float,
    time_limit: float | None,
    margin: float,
) -> tuple[VerifyStatus, tuple[Tensor, Tensor] | None]:
    """The MILP verdict on every region of ``spec`` (``regions`` are its compiled forms).

    Returns ``(status, counterexample and output or None)``.
    """
    del spec  # the regions carry everything; kept for a uniform signature
    undecided = False
    for region in regions:
        left = deadline - time.monotonic()
        if left <= 0:
            return VerifyStatus.TIMEOUT, None
        limit = left if time_limit is None else min(left, time_limit)
        answer = milp_minimum(model, region.box, region.rows.unsqueeze(0), time_limit=limit)
        bound = answer.bound.to(region.offsets) - region.offsets
        for target in range(region.n_sets):
            mine = (region.owner == target).cpu()
            if bool((bound[mine.to(bound.device)] > margin).any()):
                continue
            candidates = answer.minimiser[mine]
            found = ~candidates.flatten(1).isnan().any(dim=1)
            # HiGHS's primal point may leave the box by its feasibility tolerance: clip it in.
            inside = clip_inside(region, candidates[found].to(region.box.lower))
            hit = confirm(inside) if bool(found.any()) else None
            if hit is not None:
                return VerifyStatus.FALSIFIED, hit
            unfinished = not bool(answer.solved[mine].all()) or math.isinf(float(bound.min()))
            if unfinished and time.monotonic() > deadline:
                return VerifyStatus.TIMEOUT, None
            undecided = True
    return (VerifyStatus.UNKNOWN if undecided else VerifyStatus.VERIFIED), None
