"""The verification cascade: cheap attack -> IBP -> CROWN -> alpha-CROWN -> strong attack -> BaB.

Each stage only sees what the previous ones left open: an unsafe set is *excluded* once a row
of ``A f(x) - b`` has a sound lower bound above ``config.margin`` over the region (computed in
``config.dtype`` with its rigorous rounding error subtracted, :mod:`tightrope.verify.sound`;
NaN and overflow never exclude anything), and the property
holds when every unsafe set of every region is excluded. Any counterexample an attack or a
bound's minimiser proposes is re-checked with a float64 forward pass and
:meth:`Specification.violated_by` before the answer is ``FALSIFIED``.

Stages: PGD (Madry et al. 2018) -> IBP (Gowal et al. 2018) -> CROWN (Zhang et al. 2018) ->
alpha-CROWN (Xu et al. 2021) -> PGD with many restarts -> branch-and-bound with beta-CROWN
bounds (Wang et al. 2021) per open unsafe set, or input splitting for low-dimensional inputs.
On deep networks (``BabConfig.split_refine``, ``BabConfig.deep_layers``) branch-and-bound
starts by tightening the hidden layers' pre-activation bounds neuron by neuron
(:mod:`tightrope.verify.refine`) and bounding the open sets again with alpha-CROWN.
On networks with few unstable ReLUs, an unsafe set that branch-and-bound has not decided in its
share of the time (``BabConfig.milp_after``) goes to an exact MILP (Tjeng et al. 2019) over the
alpha-CROWN pre-activation bounds, with the set's rows as constraints; such sets are solved
concurrently, one HiGHS solve per torch thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from tightrope.bounds import (
    Box,
    certified_split_bound,
    optimise_pre_activations,
    pre_activation_bounds,
    sound_interval,
)
from tightrope.verify.attack import spec_pgd
from tightrope.verify.bab import BabOutcome, relu_bab
from tightrope.verify.config import InputSplit, Mode, VerifierConfig
from tightrope.verify.input_bab import input_bab
from tightrope.verify.milp import milp_eligible, milp_exclude, milp_verify
from tightrope.verify.problem import CompiledRegion, compile_region, confirm, float64_model
from tightrope.verify.refine import SplitRefinement, refine_by_splitting
from tightrope.verify.result import Stage, Verdict
from tightrope.verify.sound import (
    Lowered,
    bound_copy,
    check_finite,
    lowered,
    reference,
    widened,
)
from tightrope.verify.spec import Specification, VerifyStatus

__all__ = ["verify"]

Progress = Callable[[str, dict[str, float]], None]




class _Clock:
    def __init__(self, timeout: float) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout}")
        self.start = time.monotonic()
        self.deadline = self.start + timeout

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def seconds(self) -> float:
        return time.monotonic() - self.start


def verify(
    model: nn.Module,
    spec: Specification,
    timeout: float = 60.0,
    config: VerifierConfig | None = None,
    *,
    progress: Progress | None = None,
) -> Verdict:
    """Decide whether ``spec`` holds for ``model`` (Wang et al. 2021's complete verification).

    Args:
        model: an eval-mode ``nn.Sequential`` of layers ``tightrope.bounds`` supports, with
            finite parameters. Attacks and the searches for multipliers run on it; boxes and
            every closing bound on a copy in ``config.dtype`` (float64 by default), with their
            rigorous rounding error subtracted (:mod:`tightrope.verify.sound`).
        spec: the regions and unsafe sets (see :mod:`tightrope.verify.spec`).
        timeout: wall-clock seconds for the whole call.
        config: stages and branch-and-bound settings.
        progress: optional callback ``(event, numbers)``; branch-and-bound reports
            ``("bab", {"region", "unsafe_set", "domains", "open", "lowest"})`` after every
            batch (subdomains bounded so far, open ones, the lowest open bound).

    Returns:
        A :class:`Verdict`: ``VERIFIED`` from sound bounds on every region and unsafe set,
        ``FALSIFIED`` with a float64-checked counterexample, else ``TIMEOUT`` or ``UNKNOWN``.
    """
    config = VerifierConfig() if config is None else config
    if not isinstance(spec, Specification):
        raise TypeError(f"spec must be a tightrope.verify.Specification, got {type(spec)}")
    if model.training:
        raise ValueError("verify needs an eval-mode model: call model.eval() first")
    clock = _Clock(timeout)
    check_finite(model)
    exact_model = bound_copy(model, config.dtype)
    like = reference(exact_model)
    model64 = exact_model if like.dtype == torch.float64 else float64_model(model)
    regions = [compile_region(region, like) for region in spec.regions]
    search_like = reference(model)
    search_regions = regions if search_like.dtype == like.dtype else [
        compile_region(region, search_like) for region in spec.regions]
    generator = torch.Generator().manual_seed(config.seed)

    def checked(candidates: Tensor) -> tuple[Tensor, Tensor] | None:
        return confirm(spec, model64, candidates) if candidates.shape[0] else None

    def falsified(hit: tuple[Tensor, Tensor], stage: Stage, domains: int = 0) -> Verdict:
        return Verdict(VerifyStatus.FALSIFIED, stage, clock.seconds(), hit[0], hit[1], domains)

    def ending(status: VerifyStatus, stage: Stage, domains: int = 0) -> Verdict:
        if status is not VerifyStatus.VERIFIED:
            stage = Stage.NONE
        return Verdict(status, stage, clock.seconds(), domains=domains)

    def settle(outcome: BabOutcome, stage: Stage, domains: int) -> Verdict | None:
        """The verdict a search's outcome forces on the whole property (a counterexample or
        the deadline), else ``None``."""
        if outcome.status is VerifyStatus.FALSIFIED:
            if outcome.counterexample is None or outcome.output is None:
                raise RuntimeError(f"{stage.value} reported FALSIFIED without a witness")
            return falsified((outcome.counterexample, outcome.output), stage, domains)
        if outcome.status is VerifyStatus.TIMEOUT:
            return ending(VerifyStatus.TIMEOUT, stage, domains)
        return None

    with torch.no_grad():
        for region in search_regions:
            hit = checked(spec_pgd(model, region, steps=config.attack_steps,
                                   restarts=config.attack_restarts, generator=generator,
                                   deadline=clock.deadline))
            if hit is not None:
                return falsified(hit, Stage.ATTACK)
    if config.mode is Mode.MILP:
        status, hit = milp_verify(exact_model, spec, regions, checked, clock.deadline,
                                  config.milp_time_limit, config.margin)
        if hit is not None:
            return falsified(hit, Stage.MILP)
        return ending(status, Stage.MILP)

    open_sets = [torch.ones(r.n_sets, dtype=torch.bool, device=like.device) for r in regions]
    nets: dict[int, Lowered] = {}
    with torch.no_grad():
        for number, region in enumerate(regions):
            nets[number] = lowered(exact_model, model, region.box, int(region.rows.shape[0]))
            bounds = sound_interval(nets[number].exact, region.box, region.rows.unsqueeze(0),
                                    region.offsets)
            _exclude(region, open_sets[number], bounds[0], config.margin)
    if not any(bool(o.any()) for o in open_sets):
        return ending(VerifyStatus.VERIFIED, Stage.IBP)
    boxes_of: dict[int, dict[int, Box]] = {}
    set_bounds: dict[int, Tensor] = {}
    last_stage = Stage.IBP
    for stage, steps in ((Stage.CROWN, 0), (Stage.ALPHA_CROWN, config.alpha_steps)):
        if stage is Stage.ALPHA_CROWN and steps == 0:
            continue
        for number, region in enumerate(regions):
            if not bool(open_sets[number].any()):
                continue
            found = nets[number]
            if number not in boxes_of:
                with torch.no_grad():
                    crown_boxes = pre_activation_bounds(found.exact, region.box).boxes
                    boxes_of[number] = widened(found.rounding, crown_boxes)
            boxes = boxes_of[number]
            if stage is Stage.ALPHA_CROWN and config.optimise_intermediate:
                boxes = optimise_pre_activations(
                    found.exact, region.box, boxes, steps=steps, lr_alpha=config.alpha_lr,
                    deadline=clock.deadline, search=found.search)
                boxes_of[number] = boxes
            set_bounds[number] = _bound_open_sets(found, region, boxes, open_sets[number],
                                                  steps, config.alpha_lr, clock.deadline,
                                                  config.margin)
        last_stage = stage
        if not any(bool(o.any()) for o in open_sets):
            return ending(VerifyStatus.VERIFIED, last_stage)
        if clock.expired():
            return ending(VerifyStatus.TIMEOUT, last_stage)

    with torch.no_grad():
        for number, region in enumerate(search_regions):
            hit = checked(spec_pgd(model, region, steps=config.strong_attack_steps,
                                   restarts=config.strong_attack_restarts, generator=generator,
                                   active=open_sets[number], targeted=True,
                                   deadline=clock.deadline))
            if hit is not None:
                return falsified(hit, Stage.STRONG_ATTACK)
    if config.bab is None:
        return ending(VerifyStatus.UNKNOWN, last_stage)
    bab = config.bab
    total_domains = 0
    unknown = False
    used_milp = False
    for number, region in enumerate(regions):
        targets = open_sets[number].nonzero().flatten().tolist()
        if not targets:
            continue
        # Weakest bound first: a counterexample, if any, is likeliest there.
        targets.sort(key=lambda t: float(set_bounds[number][t]) if number in set_bounds else 0.0)
        input_dim = int(region.box.lower[0].numel())
        use_input = bab.input_split is InputSplit.ALWAYS or (
            bab.input_split is InputSplit.AUTO and input_dim <= bab.input_split_max_dim
        )
        found = nets[number]
        net, search_region, boxes = found.exact, search_regions[number], boxes_of[number]
        depth = len(net.relu_indices)
        refine = bab.refine_share(depth)
        if not use_input and refine > 0 and depth > 2:
            # Tighter hidden-layer bounds first (per-neuron branch-and-bound), then alpha-CROWN
            # through them on the sets still open.
            report = SplitRefinement()
            boxes = refine_by_splitting(
                net, region.box, boxes, range(1, depth - 1),
                time.monotonic() + refine * (clock.deadline - time.monotonic()),
                steps=bab.steps, lr_alpha=bab.lr_alpha, lr_beta=bab.lr_beta, report=report,
                nets=found)
            total_domains += report.domains
            boxes = optimise_pre_activations(
                net, region.box, boxes, steps=config.alpha_steps, lr_alpha=config.alpha_lr,
                deadline=clock.deadline, search=found.search)
            boxes_of[number] = boxes
            set_bounds[number] = _bound_open_sets(found, region, boxes, open_sets[number],
                                                  config.alpha_steps, config.alpha_lr,
                                                  clock.deadline, config.margin)
            targets = [t for t in targets if bool(open_sets[number][t])]
        milp_after = bab.milp_share(depth)
        exact_fallback = (not use_input and milp_after < 1.0
                          and milp_eligible(net, boxes, bab.milp_max_unstable))
        if use_input:
            # One search for all the region's open unsafe sets: each sub-box is bounded once.
            outcome = input_bab(model, found, region, search_region, open_sets[number], checked,
                                config=bab, margin=config.margin, deadline=clock.deadline,
                                generator=generator)
            total_domains += outcome.domains
            final = settle(outcome, Stage.BAB, total_domains)
            if final is not None:
                return final
            unknown |= outcome.status is VerifyStatus.UNKNOWN
            continue
        deferred: list[int] = []
        for target in targets:
            if clock.expired():
                return ending(VerifyStatus.TIMEOUT, Stage.BAB, total_domains)
            deadline = clock.deadline
            if exact_fallback:
                deadline = time.monotonic() + milp_after * (clock.deadline - time.monotonic())
            outcome = relu_bab(
                model, found, region, search_region, target, boxes, checked, config=bab,
                margin=config.margin, root_steps=config.alpha_steps,
                lr_alpha=config.alpha_lr, deadline=deadline, generator=generator,
                progress=None if progress is None else _bab_progress(progress, number, target),
            )
            total_domains += outcome.domains
            if exact_fallback and outcome.status in (VerifyStatus.TIMEOUT, VerifyStatus.UNKNOWN):
                deferred.append(target)  # branch-and-bound used its share or got stuck
                continue
            final = settle(outcome, Stage.BAB, total_domains)
            if final is not None:
                return final
            unknown |= outcome.status is VerifyStatus.UNKNOWN
        if not deferred:
            continue
        # The exact MILP decides what branch-and-bound left, a few unsafe sets at a time.
        used_milp = True
        for outcome in milp_exclude(exact_model, region, deferred, boxes, checked,
                                    margin=config.margin, deadline=clock.deadline,
                                    workers=torch.get_num_threads()):
            final = settle(outcome, Stage.MILP, total_domains)
            if final is not None:
                return final
            unknown |= outcome.status is VerifyStatus.UNKNOWN
    if unknown:
        return ending(VerifyStatus.UNKNOWN, Stage.BAB, total_domains)
    return ending(VerifyStatus.VERIFIED, Stage.MILP if used_milp else Stage.BAB, total_domains)


def _bound_open_sets(
    nets: Lowered, region: CompiledRegion, boxes: dict[int, Box], open_sets: Tensor,
    steps: int, lr_alpha: float, deadline: float, margin: float,
) -> Tensor:
    """alpha-CROWN (``steps`` ascent steps; CROWN with 0) on the rows of the ``open_sets``
    of ``region`` over the pre-activation ``boxes``, certified by the dual bound in the exact
    dtype; closes (in place) the sets it proves and returns ``(n_sets,)``: each set's best
    sound row bound (``-inf`` for sets not bounded)."""
    rows = region.rows_of(open_sets)
    C = region.rows[rows].reshape(1, -1, *nets.exact.output_shape)
    _, sound = certified_split_bound(nets.exact, region.box, C, boxes, {}, search=nets.search,
                                     steps=steps, lr_alpha=lr_alpha, deadline=deadline,
                                     offsets=region.offsets[rows])
    full = region.offsets.new_full((region.rows.shape[0],), float("-inf"))
    full[rows] = sound[0]
    _exclude(region, open_sets, full, margin)
    return full.new_full((region.n_sets,), float("-inf")).scatter_reduce(
        0, region.owner, full, reduce="amax")


def _bab_progress(
    progress: Progress, region: int, target: int
) -> Callable[[int, int, float], None]:
    def report(bounded: int, open_: int, lowest: float) -> None:
        progress("bab", {"region": float(region), "unsafe_set": float(target),
                         "domains": float(bounded), "open": float(open_), "lowest": lowest})

    return report


def _exclude(region: CompiledRegion, open_sets: Tensor, row_lower: Tensor, margin: float) -> None:
    """Close (in place) the unsafe sets of which some row has ``row_lower: (R,)`` above margin
    (sound values only: NaN never exceeds it)."""
    proven = row_lower > margin
    closed = torch.zeros_like(open_sets)
    closed = closed.scatter_reduce(0, region.owner, proven, reduce="amax")
    open_sets &= ~closed

