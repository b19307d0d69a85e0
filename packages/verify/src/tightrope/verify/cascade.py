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

A network that is not a chain of affine maps and ReLUs (residual joins, max pooling) goes
through the same stages on its graph form: its root boxes come from certified passes
(:func:`~tightrope.bounds.graph_certificate.graph_certified_root`), branch-and-bound carries
the splits to later boxes by rigorous interval arithmetic, and the per-neuron refinement and
input splitting (chain-only) are skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from tightrope.bounds import (
    Box,
    certified_split_bound,
    lower,
    optimise_pre_activations,
    pre_activation_bounds,
    sound_interval,
)
from tightrope.bounds.graph_certificate import graph_certified_bounds, graph_certified_root
from tightrope.bounds.network import MaxPool
from tightrope.verify.attack import spec_pgd
from tightrope.verify.bab import BabOutcome, relu_bab
from tightrope.verify.config import BabConfig, InputSplit, Mode, VerifierConfig
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


class _Run:
    """What one :func:`verify` call carries from stage to stage: the model in both dtypes, the
    compiled regions, which unsafe sets are still open, and what the bound stages computed
    (each region's lowered networks, root pre-activation boxes and best set bounds), so that
    no later stage recomputes it."""

    def __init__(self, model: nn.Module, spec: Specification, timeout: float,
                 config: VerifierConfig, progress: Progress | None) -> None:
        self.clock = _Clock(timeout)
        check_finite(model)
        self.model, self.spec, self.config, self.progress = model, spec, config, progress
        self.exact_model = bound_copy(model, config.dtype)
        like = reference(self.exact_model)
        self.model64 = (self.exact_model if like.dtype == torch.float64
                        else float64_model(model))
        self.regions = [compile_region(region, like) for region in spec.regions]
        search_like = reference(model)
        self.search_regions = self.regions if search_like.dtype == like.dtype else [
            compile_region(region, search_like) for region in spec.regions]
        self.generator = torch.Generator().manual_seed(config.seed)
        self.open_sets = [torch.ones(r.n_sets, dtype=torch.bool, device=like.device)
                          for r in self.regions]
        #: Each region's network lowered twice (a chain, or a graph such as a residual network:
        #: then its boxes come from certified passes, :attr:`Lowered.is_graph`).
        self.nets: dict[int, Lowered] = {}
        self.boxes_of: dict[int, dict[int, Box]] = {}
        self.set_bounds: dict[int, Tensor] = {}
        self.last_stage = Stage.IBP
        self.domains = 0

    def checked(self, candidates: Tensor) -> tuple[Tensor, Tensor] | None:
        """A float64-confirmed counterexample among ``candidates``, else ``None``."""
        return confirm(self.spec, self.model64, candidates) if candidates.shape[0] else None

    def falsified(self, hit: tuple[Tensor, Tensor], stage: Stage) -> Verdict:
        return Verdict(VerifyStatus.FALSIFIED, stage, self.clock.seconds(), hit[0], hit[1],
                       self.domains)

    def ending(self, status: VerifyStatus, stage: Stage) -> Verdict:
        if status is not VerifyStatus.VERIFIED:
            stage = Stage.NONE
        return Verdict(status, stage, self.clock.seconds(), domains=self.domains)

    def settle(self, outcome: BabOutcome, stage: Stage) -> Verdict | None:
        """The verdict a search's outcome forces on the whole property (a counterexample or
        the deadline), else ``None``; counts its subdomains."""
        self.domains += outcome.domains
        if outcome.status is VerifyStatus.FALSIFIED:
            if outcome.counterexample is None or outcome.output is None:
                raise RuntimeError(f"{stage.value} reported FALSIFIED without a witness")
            return self.falsified((outcome.counterexample, outcome.output), stage)
        if outcome.status is VerifyStatus.TIMEOUT:
            return self.ending(VerifyStatus.TIMEOUT, stage)
        return None

    def all_closed(self) -> bool:
        return not any(bool(o.any()) for o in self.open_sets)


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
        model: an eval-mode model ``tightrope.bounds`` supports (a chain, or a graph such as
            a residual network: see :mod:`tightrope.bounds.graph`), with finite parameters.
            Attacks and the searches for multipliers run on it; boxes and every closing bound
            on a copy in ``config.dtype`` (float64 by default), with their rigorous rounding
            error subtracted (:mod:`tightrope.verify.sound`).
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
    run = _Run(model, spec, timeout, config, progress)
    for stage in (_attack, _milp_mode, _interval, _linear, _strong_attack, _branch_and_bound):
        verdict = stage(run)
        if verdict is not None:
            return verdict
    raise AssertionError("the branch-and-bound stage always answers")


def _attack(run: _Run) -> Verdict | None:
    """PGD in every region (the cheap attack)."""
    config = run.config
    with torch.no_grad():
        for region in run.search_regions:
            hit = run.checked(spec_pgd(run.model, region, steps=config.attack_steps,
                                       restarts=config.attack_restarts,
                                       generator=run.generator, deadline=run.clock.deadline))
            if hit is not None:
                return run.falsified(hit, Stage.ATTACK)
    return None


def _milp_mode(run: _Run) -> Verdict | None:
    """``Mode.MILP``: every row minimised exactly; the answer whatever it is."""
    if run.config.mode is not Mode.MILP:
        return None
    status, hit = milp_verify(run.exact_model, run.spec, run.regions, run.checked,
                              run.clock.deadline, run.config.milp_time_limit, run.config.margin)
    if hit is not None:
        return run.falsified(hit, Stage.MILP)
    return run.ending(status, Stage.MILP)


def _interval(run: _Run) -> Verdict | None:
    """Sound interval bounds of every row; lowers each region's network once for all later
    stages."""
    with torch.no_grad():
        for number, region in enumerate(run.regions):
            exact = lower(run.exact_model, region.box.center)
            rows = region.rows.unsqueeze(0)
            found = lowered(run.exact_model, run.model, region.box, int(region.rows.shape[0]),
                            exact=exact)
            run.nets[number] = found
            if found.is_graph:
                bounds = graph_certified_bounds(exact, region.box, rows, region.offsets,
                                                crown=False)
            else:
                bounds = sound_interval(exact, region.box, rows, region.offsets)
            _exclude(region, run.open_sets[number], bounds[0], run.config.margin)
    return run.ending(VerifyStatus.VERIFIED, Stage.IBP) if run.all_closed() else None


def _linear(run: _Run) -> Verdict | None:
    """CROWN, then alpha-CROWN (its slopes optimised for the intermediate bounds too when
    ``optimise_intermediate``), on the sets still open; keeps each region's root boxes."""
    config = run.config
    for stage, steps in ((Stage.CROWN, 0), (Stage.ALPHA_CROWN, config.alpha_steps)):
        if stage is Stage.ALPHA_CROWN and steps == 0:
            continue
        for number, region in enumerate(run.regions):
            if not bool(run.open_sets[number].any()):
                continue
            found = run.nets[number]
            if number not in run.boxes_of:
                run.boxes_of[number] = _root_boxes(found, region)
            boxes = run.boxes_of[number]
            if stage is Stage.ALPHA_CROWN and config.optimise_intermediate:
                boxes = optimise_pre_activations(
                    found.exact, region.box, boxes, steps=steps, lr_alpha=config.alpha_lr,
                    deadline=run.clock.deadline, search=found.search)
                run.boxes_of[number] = boxes
            run.set_bounds[number] = _bound_open_sets(
                found, region, boxes, run.open_sets[number], steps, config.alpha_lr,
                run.clock.deadline, config.margin)
        run.last_stage = stage
        if run.all_closed():
            return run.ending(VerifyStatus.VERIFIED, stage)
        if run.clock.expired():
            return run.ending(VerifyStatus.TIMEOUT, stage)
    return None


def _strong_attack(run: _Run) -> Verdict | None:
    """PGD with many restarts, one open unsafe set per restart in turn."""
    config = run.config
    with torch.no_grad():
        for number, region in enumerate(run.search_regions):
            hit = run.checked(spec_pgd(run.model, region, steps=config.strong_attack_steps,
                                       restarts=config.strong_attack_restarts,
                                       generator=run.generator, active=run.open_sets[number],
                                       targeted=True, deadline=run.clock.deadline))
            if hit is not None:
                return run.falsified(hit, Stage.STRONG_ATTACK)
    return None


def _branch_and_bound(run: _Run) -> Verdict:
    """Input or ReLU splitting on every region's open sets (and the MILP for those a ReLU
    search leaves); the final answer."""
    bab = run.config.bab
    if bab is None:
        return run.ending(VerifyStatus.UNKNOWN, run.last_stage)
    unknown = False
    used_milp = False
    for number, region in enumerate(run.regions):
        if not bool(run.open_sets[number].any()):
            continue
        input_dim = int(region.box.lower[0].numel())
        if not run.nets[number].is_graph and (bab.input_split is InputSplit.ALWAYS or (
            bab.input_split is InputSplit.AUTO and input_dim <= bab.input_split_max_dim
        )):
            # One search for all the region's open unsafe sets: each sub-box is bounded once.
            outcome = input_bab(run.model, run.nets[number], region,
                                run.search_regions[number], run.open_sets[number], run.checked,
                                config=bab, margin=run.config.margin,
                                deadline=run.clock.deadline, generator=run.generator)
            final = run.settle(outcome, Stage.BAB)
            if final is not None:
                return final
            unknown |= outcome.status is VerifyStatus.UNKNOWN
            continue
        final, undecided, milp = _relu_searches(run, number, bab)
        if final is not None:
            return final
        unknown |= undecided
        used_milp |= milp
    if unknown:
        return run.ending(VerifyStatus.UNKNOWN, Stage.BAB)
    return run.ending(VerifyStatus.VERIFIED, Stage.MILP if used_milp else Stage.BAB)


def _relu_searches(run: _Run, number: int, bab: BabConfig
                   ) -> tuple[Verdict | None, bool, bool]:
    """ReLU-splitting branch-and-bound on each open unsafe set of region ``number``, weakest
    bound first (a counterexample is likeliest there), after the per-neuron refinement on deep
    networks; the sets it leaves go to the MILP on small networks. Returns the final verdict
    if one is forced, whether some set stayed undecided, and whether the MILP ran."""
    region, found = run.regions[number], run.nets[number]
    targets = run.open_sets[number].nonzero().flatten().tolist()
    targets.sort(key=lambda t: float(run.set_bounds[number][t])
                 if number in run.set_bounds else 0.0)
    net, boxes = found.exact, run.boxes_of[number]
    depth = len(net.relu_indices)
    refine = bab.refine_share(depth)
    if refine > 0 and depth > 2 and not found.is_graph:  # the refinement takes chains
        boxes = _refine(run, number, refine)
        targets = [t for t in targets if bool(run.open_sets[number][t])]
    milp_after = bab.milp_share(depth, any(isinstance(op, MaxPool) for op in net.ops))
    exact_fallback = milp_after < 1.0 and milp_eligible(net, boxes, bab.milp_max_unstable)
    deferred: list[int] = []
    unknown = False
    for target in targets:
        if run.clock.expired():
            return run.ending(VerifyStatus.TIMEOUT, Stage.BAB), unknown, False
        deadline = run.clock.deadline
        if exact_fallback:
            deadline = time.monotonic() + milp_after * (run.clock.deadline - time.monotonic())
        outcome = relu_bab(
            run.model, found, region, run.search_regions[number], target, boxes, run.checked,
            config=bab, margin=run.config.margin, root_steps=run.config.alpha_steps,
            lr_alpha=run.config.alpha_lr, deadline=deadline, generator=run.generator,
            progress=None if run.progress is None else _bab_progress(run.progress, number,
                                                                      target),
        )
        if exact_fallback and outcome.status in (VerifyStatus.TIMEOUT, VerifyStatus.UNKNOWN):
            run.domains += outcome.domains
            deferred.append(target)  # branch-and-bound used its share or got stuck
            continue
        final = run.settle(outcome, Stage.BAB)
        if final is not None:
            return final, unknown, False
        unknown |= outcome.status is VerifyStatus.UNKNOWN
    if not deferred:
        return None, unknown, False
    # The exact MILP decides what branch-and-bound left, a few unsafe sets at a time.
    for outcome in milp_exclude(run.exact_model, region, deferred, boxes, run.checked,
                                margin=run.config.margin, deadline=run.clock.deadline,
                                workers=torch.get_num_threads()):
        final = run.settle(outcome, Stage.MILP)
        if final is not None:
            return final, unknown, True
        unknown |= outcome.status is VerifyStatus.UNKNOWN
    return None, unknown, True


def _refine(run: _Run, number: int, share: float) -> dict[int, Box]:
    """Tighter hidden-layer bounds of region ``number`` (per-neuron branch-and-bound, in
    ``share`` of the time left), then alpha-CROWN through them on the sets still open; returns
    (and keeps) the region's new root boxes."""
    region, found, config = run.regions[number], run.nets[number], run.config
    bab = config.bab
    assert bab is not None
    depth = len(found.exact.relu_indices)
    report = SplitRefinement()
    boxes = refine_by_splitting(
        found.exact, region.box, run.boxes_of[number], range(1, depth - 1),
        time.monotonic() + share * (run.clock.deadline - time.monotonic()),
        steps=bab.steps, lr_alpha=bab.lr_alpha, lr_beta=bab.lr_beta, report=report,
        nets=found)
    run.domains += report.domains
    boxes = optimise_pre_activations(
        found.exact, region.box, boxes, steps=config.alpha_steps, lr_alpha=config.alpha_lr,
        deadline=run.clock.deadline, search=found.search)
    run.boxes_of[number] = boxes
    run.set_bounds[number] = _bound_open_sets(found, region, boxes, run.open_sets[number],
                                              config.alpha_steps, config.alpha_lr,
                                              run.clock.deadline, config.margin)
    return boxes


def _root_boxes(found: Lowered, region: CompiledRegion) -> dict[int, Box]:
    """CROWN's boxes of every relaxed op's input over the region, valid in exact arithmetic:
    a chain's widened by their a priori rounding error, a graph's from certified passes."""
    with torch.no_grad():
        if found.rounding is None:
            return graph_certified_root(found.exact, region.box,
                                        int(region.rows.shape[0])).boxes
        return widened(found.rounding, pre_activation_bounds(found.exact, region.box).boxes)


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

