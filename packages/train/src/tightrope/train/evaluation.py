"""Per-epoch evaluation: clean, PGD, IBP- and CROWN-IBP-verified (and TAPS) accuracy.

"Verified" comes only from sound bounds (IBP, Gowal et al. 2018; CROWN-IBP, Zhang et al. 2020)
of the model in eval mode; the PGD accuracy (Madry et al. 2018) is an upper bound on the true
robust accuracy and the verified accuracies are lower bounds. TAPS accuracy (Mao et al. 2023) is
the TAPS estimate, neither sound nor complete, reported for TAPS/STAPS runs as the paper does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tightrope.attacks import PGDConfig, pgd
from tightrope.bounds import Box, crown_ibp, ibp, margin_spec
from tightrope.losses import TAPSConfig, resolve_split, taps_bounds

__all__ = ["EvalSettings", "evaluate"]


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalSettings:
    """What :func:`evaluate` measures.

    Attributes:
        eps: the radius (pixel units).
        pgd: the attack of the adversarial accuracy.
        crown_ibp: also compute CROWN-IBP bounds.
        taps: TAPS settings for the TAPS accuracy, or ``None``.
        seed: seed of the attacks' random starts (a fresh generator per call, so evaluation never
            touches the training randomness).
        max_samples: stop after this many samples (``None``: the whole loader).
    """

    eps: float
    pgd: PGDConfig
    crown_ibp: bool = True
    taps: TAPSConfig | None = None
    seed: int = 0
    max_samples: int | None = None


def _verified(lower: Tensor) -> Tensor:
    return (lower > 0).all(dim=1)


def evaluate(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], settings: EvalSettings
) -> dict[str, float]:
    """Accuracies of ``model`` (put in eval mode, restored afterwards) over ``batches``.

    Args:
        model: an ``nn.Sequential`` the bounds accept, inputs in ``[0, 1]``.
        batches: ``(x, y)`` with ``x: (b, *S)`` in ``[0, 1]``, ``y: (b,)``.
        settings: see :class:`EvalSettings`.

    Returns:
        Counts turned into fractions: ``clean_accuracy``, ``pgd_accuracy``,
        ``ibp_verified_accuracy``, ``crown_ibp_verified_accuracy`` (when asked),
        ``verified_accuracy`` (verified by either bound), ``taps_accuracy`` (when asked) and
        ``samples``; also the raw ``*_count`` sums for combining shards.
    """
    was_training = model.training
    model.eval()
    counts: dict[str, float] = {"samples": 0.0, "clean_count": 0.0, "pgd_count": 0.0,
                                "ibp_count": 0.0, "verified_count": 0.0}
    if settings.crown_ibp:
        counts["crown_ibp_count"] = 0.0
    if settings.taps is not None:
        counts["taps_count"] = 0.0
    generator: torch.Generator | None = None
    try:
        for x, y in batches:
            if settings.max_samples is not None:
                left = settings.max_samples - int(counts["samples"])
                if left <= 0:
                    break
                x, y = x[:left], y[:left]
            if generator is None:
                generator = torch.Generator(device=x.device).manual_seed(settings.seed)
            _evaluate_batch(model, x, y, settings, generator, counts)
    finally:
        model.train(was_training)
    return summarise(counts)


def _evaluate_batch(model: nn.Module, x: Tensor, y: Tensor, settings: EvalSettings,
                    generator: torch.Generator, counts: dict[str, float]) -> None:
    with torch.no_grad():
        logits = model(x)
        num_classes = logits.shape[1]
        C = margin_spec(y, num_classes, dtype=x.dtype).to(x.device)
        box = Box.from_linf(x, settings.eps)
        verified = _verified(ibp(model, box, C).lower)
        counts["ibp_count"] += float(verified.sum())
        if settings.crown_ibp:
            by_crown = _verified(crown_ibp(model, box, C, upper=False).lower)
            counts["crown_ibp_count"] += float(by_crown.sum())
            verified = verified | by_crown
    correct = logits.argmax(dim=1) == y
    counts["samples"] += float(x.shape[0])
    counts["clean_count"] += float(correct.sum())
    counts["verified_count"] += float(verified.sum())
    if settings.eps > 0 and settings.pgd.steps > 0:
        robust = pgd(model, x, y, settings.eps, config=settings.pgd, generator=generator).robust
        counts["pgd_count"] += float((robust & correct).sum())
    else:
        counts["pgd_count"] += float(correct.sum())
    if settings.taps is not None and isinstance(model, nn.Sequential):
        split = resolve_split(model, settings.taps.split, settings.taps.classifier_relus)
        if split == len(model):
            counts["taps_count"] += float(_verified(ibp(model, box, C).lower).sum())
        else:
            found = taps_bounds(model, box, y, split, c=settings.taps.connector_c,
                                estimators=settings.taps.estimators, generator=generator)
            counts["taps_count"] += float(_verified(found.taps.detach()).sum())


def summarise(counts: dict[str, float]) -> dict[str, float]:
    """Fractions from the ``*_count`` sums (kept alongside them)."""
    samples = max(counts["samples"], 1.0)
    names = {"clean_count": "clean_accuracy", "pgd_count": "pgd_accuracy",
             "ibp_count": "ibp_verified_accuracy", "crown_ibp_count": "crown_ibp_verified_accuracy",
             "verified_count": "verified_accuracy", "taps_count": "taps_accuracy"}
    result = dict(counts)
    for count, name in names.items():
        if count in counts:
            result[name] = counts[count] / samples
    return result
