"""Batched certification of l_inf robustness of many samples (a checkpoint's test set).

Each stage runs batched over the samples still undecided (Wang et al. 2021's cascade):

1. ``CLEAN``: a misclassified sample is not robust; ``x`` itself is the counterexample;
2. ``ATTACK``: PGD (Madry et al. 2018, :func:`tightrope.attacks.pgd`);
3. ``IBP`` (Gowal et al. 2018), 4. ``CROWN`` (Zhang et al. 2018), 5. ``ALPHA_CROWN``
   (Xu et al. 2021) on the margin specification ``e_y - e_j``;
6. ``STRONG_ATTACK``: APGD with restarts (Croce & Hein 2020, :func:`tightrope.attacks.apgd`);
7. ``BAB``: :func:`tightrope.verify.verify` per sample with what is left of its time budget.

Every counterexample is re-checked with a float64 forward pass and ``violated_by`` of the
sample's :func:`robustness_spec` (attack points are first clipped into its float64 box). The
bound stages run on a copy of the model in ``config.dtype`` (float64 by default) over that
box and close a sample only with sound bounds (:mod:`tightrope.verify.sound`). The time of a
batched stage is shared equally by the samples it processed, and the stage stops (attacks
between steps and restarts, alpha-CROWN between steps) before any of them would exceed its
budget (``timeout_per_sample``); what is left of a sample's budget bounds its
branch-and-bound.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from tightrope.attacks import APGDConfig, Objective, PGDConfig, apgd, pgd
from tightrope.bounds import (
    Box,
    Network,
    certified_split_bound,
    lower,
    margin_spec,
    pre_activation_bounds,
    sound_interval,
)
from tightrope.bounds.graph_certificate import (
    CertifiedRoot,
    graph_alpha_bounds,
    graph_certified_bounds,
    graph_certified_root,
)
from tightrope.verify.cascade import verify
from tightrope.verify.config import VerifierConfig
from tightrope.verify.problem import float64_model, rounded_box
from tightrope.verify.result import Stage, Verdict
from tightrope.verify.sound import bound_copy, check_finite, lowered, reference, widened
from tightrope.verify.spec import VerifyStatus, linf_box, robustness_spec

__all__ = ["Certification", "certify"]

#: ``progress(stage, decided so far, total)`` after every stage and every BaB sample.
CertifyProgress = Callable[[Stage, int, int], None]


@dataclass(frozen=True, slots=True)
class Certification:
    """Per-sample verdicts of :func:`certify`, in input order.

    Attributes:
        verdicts: one per sample.
        stage_seconds: per sample, the seconds each stage spent on it (its share of a batched
            stage; ``Stage.BAB``: its own run of :func:`tightrope.verify.verify`, the MILP
            stage included); they sum to the verdict's ``seconds``.
    """

    verdicts: tuple[Verdict, ...]
    stage_seconds: tuple[Mapping[Stage, float], ...] = ()

    def __len__(self) -> int:
        return len(self.verdicts)

    @property
    def verified(self) -> Tensor:
        """``(N,)`` bool: certified robust."""
        return torch.tensor([v.status is VerifyStatus.VERIFIED for v in self.verdicts])

    @property
    def falsified(self) -> Tensor:
        """``(N,)`` bool: a counterexample (or a clean misclassification) was found."""
        return torch.tensor([v.status is VerifyStatus.FALSIFIED for v in self.verdicts])

    def stage_counts(self) -> dict[Stage, int]:
        """How many samples each stage decided (``Stage.NONE``: undecided); sums to ``N``."""
        counts = Counter(v.stage for v in self.verdicts)
        return {stage: counts.get(stage, 0) for stage in Stage}

    def status_counts(self) -> dict[VerifyStatus, int]:
        """How many samples got each status; sums to ``N``."""
        counts = Counter(v.status for v in self.verdicts)
        return {status: counts.get(status, 0) for status in VerifyStatus}


def certify(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    timeout_per_sample: float = 60.0,
    config: VerifierConfig | None = None,
    progress: CertifyProgress | None = None,
    generator: torch.Generator | None = None,
) -> Certification:
    """Certify l_inf robustness of ``model`` at every ``(x[i], y[i])`` with radius ``eps``.

    Args:
        model: eval-mode classifier ``(N, *S) -> (N, K)`` of layers ``tightrope.bounds``
            supports (input normalisation inside the model).
        x: ``(N, *S)`` inputs in ``[0, 1]``, in the model's dtype and device.
        y: ``(N,)`` integer labels.
        eps: l_inf radius in pixel space.
        timeout_per_sample: seconds each sample may use (its share of the batched stages plus
            its branch-and-bound).
        config: stage settings; ``config.bab = None`` stops after the strong attack.
        progress: optional callback ``(stage, decided, total)``.
        generator: randomness of the attacks (default: seeded with ``config.seed``).
    """
    config = VerifierConfig() if config is None else config
    if model.training:
        raise ValueError("certify needs an eval-mode model: call model.eval() first")
    if x.dim() < 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be (N, *S) and y (N,), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    if not timeout_per_sample > 0:
        raise ValueError(f"timeout_per_sample must be positive, got {timeout_per_sample}")
    generator = torch.Generator().manual_seed(config.seed) if generator is None else generator
    total = x.shape[0]
    seconds = [0.0] * total
    spent_in: list[dict[Stage, float]] = [{} for _ in range(total)]
    decided: dict[int, Verdict] = {}
    check_finite(model)
    model64 = float64_model(model)
    bounded = bound_copy(model, config.dtype)
    with torch.no_grad():
        logits = model(x)
    num_classes = int(logits.shape[1])
    specs = [robustness_spec(x[i : i + 1], int(y[i]), eps, num_classes) for i in range(total)]

    def share(indices: list[int], start: float, stage: Stage) -> None:
        spent = (time.monotonic() - start) / max(1, len(indices))
        for i in indices:
            seconds[i] += spent
            spent_in[i][stage] = spent_in[i].get(stage, 0.0) + spent

    def falsify(i: int, point: Tensor, stage: Stage) -> bool:
        box = specs[i].regions[0].box
        point = torch.minimum(torch.maximum(point.to(box.lower), box.lower), box.upper)
        with torch.no_grad():
            output = model64(point).flatten(1)
        if specs[i].violated_by(point, output):
            decided[i] = Verdict(VerifyStatus.FALSIFIED, stage, seconds[i], point, output)
            return True
        return False

    def stage_deadline(todo: list[int], start: float) -> float:
        """When a batched stage over ``todo`` must stop: its time is shared equally, so no
        sample may get more than what is left of its budget."""
        left = min(timeout_per_sample - seconds[i] for i in todo)
        return start + len(todo) * max(0.0, left)

    def report(stage: Stage) -> None:
        if progress is not None:
            progress(stage, len(decided), total)

    # 1. clean predictions
    start = time.monotonic()
    wrong = (logits.argmax(dim=1) != y).nonzero().flatten().tolist()
    share(list(range(total)), start, Stage.CLEAN)
    for i in wrong:
        falsify(i, x[i : i + 1], Stage.CLEAN)
    report(Stage.CLEAN)

    def open_() -> list[int]:
        return [i for i in range(total) if i not in decided]

    # 2. cheap PGD, 6. strong APGD; 3-5. bounds
    def attack(stage: Stage) -> None:
        todo = open_()
        if not todo:
            return
        start = time.monotonic()
        deadline = stage_deadline(todo, start)
        index = torch.tensor(todo, device=x.device)
        if stage is Stage.ATTACK:
            if config.attack_restarts == 0 or config.attack_steps == 0:
                return
            result = pgd(model, x[index], y[index], eps, generator=generator,
                         config=PGDConfig(steps=config.attack_steps, restarts=1,
                                          objective=Objective.MARGIN), deadline=deadline)
        else:
            if config.strong_attack_restarts == 0 or config.strong_attack_steps == 0:
                return
            result = apgd(model, x[index], y[index], eps, generator=generator,
                          config=APGDConfig(steps=config.strong_attack_steps,
                                            restarts=max(1, config.strong_attack_restarts // 8),
                                            objective=Objective.DLR), deadline=deadline)
        share(todo, start, stage)
        for position in result.success.nonzero().flatten().tolist():
            i = todo[position]
            falsify(i, result.x_adv[position : position + 1], stage)
        report(stage)

    graph_root: list[tuple[list[int], CertifiedRoot]] = []

    def bound(stage: Stage) -> None:
        todo = open_()
        if not todo:
            return
        start = time.monotonic()
        index = torch.tensor(todo, device=x.device)
        like = reference(bounded)
        box = rounded_box(linf_box(x[index], eps), like)[0]
        C = margin_spec(y[index], num_classes, dtype=like.dtype)
        with torch.no_grad():
            exact = lower(bounded, box.center)
        if not exact.is_relu_chain:
            # A graph (residual joins, max pooling): certified IBP, CROWN and alpha-CROWN on
            # the output over one certified root (branch-and-bound follows per sample).
            sound = _graph_stage(exact, model, box, C, stage, config,
                                 stage_deadline(todo, start), todo, graph_root)
        elif stage is Stage.IBP:
            sound = sound_interval(exact, box, C)
        else:
            with torch.no_grad():
                nets = lowered(bounded, model, box, int(C.shape[1]), exact=exact)
                boxes = widened(nets.rounding, pre_activation_bounds(nets.exact, box).boxes)
            steps = 0 if stage is Stage.CROWN else config.alpha_steps
            _, sound = certified_split_bound(nets.exact, box, C, boxes, {}, search=nets.search,
                                             steps=steps, lr_alpha=config.alpha_lr,
                                             deadline=stage_deadline(todo, start))
        share(todo, start, stage)
        for position in ((sound > config.margin).all(dim=1)).nonzero().flatten().tolist():
            i = todo[position]
            decided[i] = Verdict(VerifyStatus.VERIFIED, stage, seconds[i])
        report(stage)

    attack(Stage.ATTACK)
    for stage in (Stage.IBP, Stage.CROWN, Stage.ALPHA_CROWN):
        if stage is Stage.ALPHA_CROWN and config.alpha_steps == 0:
            continue
        bound(stage)
    attack(Stage.STRONG_ATTACK)
    if config.bab is not None:
        single = replace(config, attack_restarts=0, strong_attack_restarts=0)
        for i in open_():
            left = timeout_per_sample - seconds[i]
            if left <= 0:
                decided[i] = Verdict(VerifyStatus.TIMEOUT, Stage.NONE, seconds[i])
                continue
            verdict = verify(model, specs[i], timeout=left, config=single)
            seconds[i] += verdict.seconds
            spent_in[i][Stage.BAB] = spent_in[i].get(Stage.BAB, 0.0) + verdict.seconds
            decided[i] = replace(verdict, seconds=seconds[i])
            report(Stage.BAB)
    for i in open_():
        decided[i] = Verdict(VerifyStatus.UNKNOWN, Stage.NONE, seconds[i])
    return Certification(tuple(replace(decided[i], seconds=seconds[i]) for i in range(total)),
                         tuple(spent_in))


def _graph_stage(net: Network, model: nn.Module, box: Box, C: Tensor, stage: Stage,
                 config: VerifierConfig, deadline: float, todo: list[int],
                 kept: list[tuple[list[int], CertifiedRoot]]) -> Tensor:
    """Sound margin bounds ``(B, K)`` of a batched bound stage on a graph network ``net`` (the
    model in the verifier's dtype), for the samples ``todo``; ``kept`` holds the CROWN stage's
    samples and certified root, which the alpha-CROWN stage reuses for the samples left. The
    alpha-CROWN slopes are searched on ``model`` in its own dtype."""
    if stage is Stage.IBP:
        return graph_certified_bounds(net, box, C, crown=False)
    if stage is Stage.CROWN:
        root = graph_certified_root(net, box, int(C.shape[1]))
        kept[:] = [(list(todo), root)]
        return graph_certified_bounds(net, box, C, root=root)
    if kept and set(todo) <= set(kept[0][0]):
        where = {sample: position for position, sample in enumerate(kept[0][0])}
        root = kept[0][1].select(torch.tensor([where[sample] for sample in todo]))
    else:
        root = graph_certified_root(net, box, int(C.shape[1]))
    search = net
    if reference(model).dtype != net.like.dtype:
        with torch.no_grad():
            search = lower(model, box.center.to(reference(model).dtype))
    return graph_alpha_bounds(net, box, C, root, steps=config.alpha_steps, lr=config.alpha_lr,
                              deadline=deadline, search=search)
