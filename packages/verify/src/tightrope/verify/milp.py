"""Exact answers from the mixed-integer program (Tjeng et al. 2019).

``Mode.MILP`` (:func:`milp_verify`):

Every row of every unsafe set is minimised exactly over its region with HiGHS
(:func:`tightrope.bounds.milp_minimum`). An unsafe set is excluded when some row's proven lower
bound exceeds the margin; a row minimiser that satisfies the whole unsafe set (re-checked in
float64) is a counterexample. A set of several rows whose every row can reach ``<= 0`` but not
at one common point stays undecided (``UNKNOWN``): the per-row programs do not capture the
conjunction. Small networks only (the MILP has a binary per unstable ReLU).
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch
from torch import Tensor, nn

from tightrope.bounds import (
    Box,
    MilpSearch,
    MilpStatus,
    Network,
    milp_fits,
    milp_minimum,
    milp_search,
)
from tightrope.verify.bab import BabOutcome
from tightrope.verify.problem import CompiledRegion, clip_inside
from tightrope.verify.spec import Specification, VerifyStatus

__all__ = ["HIGHS_OVERRUN", "milp_eligible", "milp_exclude", "milp_verify"]

#: Seconds kept back from each MILP's share of the time: HiGHS stops only between its own
#: steps (a root LP is not interrupted) and SciPy hands it the program before its clock starts.
#: Measured on MNIST CNN3 certifications at ``--timeout 10``: solves ended 0.40-0.51 s after
#: the time limit without this reserve.
HIGHS_OVERRUN = 0.6


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


def milp_eligible(net: Network, boxes: Mapping[int, Box], max_unstable: int) -> bool:
    """Whether the cascade may hand an unsafe set to :func:`milp_exclude`: SciPy is
    installed, the MILP stays within the oracle's size cap and the root has at most
    ``max_unstable`` unstable ReLUs (one binary each)."""
    if importlib.util.find_spec("scipy") is None or not boxes:
        return False
    unstable = sum(int(((b.lower < 0) & (b.upper > 0)).sum())
                   for i, b in boxes.items() if i in net.relu_indices)
    return unstable <= max_unstable and milp_fits(net)  # the size rule milp_search applies


def milp_exclude(
    model: nn.Module,
    region: CompiledRegion,
    targets: Sequence[int],
    boxes: Mapping[int, Box],
    confirm: Callable[[Tensor], tuple[Tensor, Tensor] | None],
    *,
    margin: float,
    deadline: float,
    workers: int = 1,
) -> Iterator[BabOutcome]:
    """Decide unsafe sets ``targets`` of ``region``, one MILP each (:func:`milp_search`).

    Each set ``A f(x) <= b``, widened by ``margin``, is searched over the region's box with the
    given (sound) pre-activation bounds: HiGHS proving it empty gives ``VERIFIED``; a point it
    finds is a counterexample only once ``confirm`` re-checks it in float64 (else
    ``UNKNOWN``); running out of time gives ``TIMEOUT``. Up to ``workers`` solves run at once
    in threads (HiGHS releases the GIL); outcomes are yielded as they finish. Each solve is
    given ``deadline - HIGHS_OVERRUN`` (HiGHS overruns its limit a little) and cannot be
    interrupted: should the caller stop early, the others run on to their limit.
    """

    def solve(target: int) -> tuple[int, MilpSearch | None]:
        left = deadline - time.monotonic()
        if left <= 0:
            return target, None
        mine = region.owner == target
        rows = region.rows[mine].unsqueeze(0)
        return target, milp_search(model, region.box, rows, region.offsets[mine] + margin,
                                   boxes=dict(boxes), deadline=deadline - HIGHS_OVERRUN)

    def outcome(found: MilpSearch | None) -> BabOutcome:
        if found is None or found.status is MilpStatus.UNKNOWN:
            return BabOutcome(VerifyStatus.TIMEOUT)
        if found.status is MilpStatus.INFEASIBLE:
            return BabOutcome(VerifyStatus.VERIFIED)
        if found.status is MilpStatus.UNTRUSTED:
            return BabOutcome(VerifyStatus.UNKNOWN)
        if found.point is None:
            return BabOutcome(VerifyStatus.TIMEOUT)
        with torch.no_grad():
            hit = confirm(clip_inside(region, found.point.to(region.box.lower)))
        if hit is None:
            return BabOutcome(VerifyStatus.UNKNOWN)
        return BabOutcome(VerifyStatus.FALSIFIED, hit[0], hit[1])

    if workers <= 1 or len(targets) == 1:
        for target in targets:
            yield outcome(solve(target)[1])
        return
    pool = ThreadPoolExecutor(max_workers=min(workers, len(targets)))
    try:
        futures = [pool.submit(solve, target) for target in targets]
        for future in as_completed(futures):
            yield outcome(future.result()[1])
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
