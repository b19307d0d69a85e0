"""The report's rows: one per certification of a run (a run without one gets a row of its
own), grouped by setting (data set and eps) and sorted, so that the same inputs always give the
same tables."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tightrope.apps.report.inputs import Certification, Run, lookup

__all__ = ["BLANK", "Row", "Setting", "eps_text", "group_rows", "label_text"]

#: What a table cell shows for a value the inputs do not have (an en dash).
BLANK = "\u2013"


def eps_text(eps: float) -> str:
    """``0.1`` -> ``"0.1"``, ``2/255`` -> ``"2/255"`` (eps of CIFAR-10 and TinyImageNet)."""
    if float(f"{eps:.4g}") == eps:
        return f"{eps:g}"
    steps = round(eps * 255)
    if steps and steps / 255 == eps:
        return f"{steps}/255"
    return repr(eps)


def label_text(value: Any) -> str:
    """A config value as the tables and figures show it."""
    if value is None:
        return BLANK
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass(frozen=True, slots=True, order=True)
class Setting:
    """A data set and the l_inf radius its runs are compared at."""

    dataset: str
    eps: float

    @property
    def title(self) -> str:
        return f"{self.dataset}, eps = {eps_text(self.eps)}"

    @property
    def slug(self) -> str:
        """For file names: ``cifar10-eps2_255``."""
        return f"{self.dataset}-eps{eps_text(self.eps).replace('/', '_')}"


def _fraction(table: Mapping[str, Any] | None, key: str) -> float | None:
    if table is None:
        return None
    value = table.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


@dataclass(frozen=True, slots=True)
class Row:
    """A run, one of its certifications (or none) and its value of the ``--label`` key."""

    run: Run
    certification: Certification | None
    label: Any

    @property
    def clean(self) -> float | None:
        """Clean accuracy of ``best.pt`` on the test split (``test_metrics.json``); without
        it, the certification's clean accuracy on its samples (see :attr:`clean_from_certify`)."""
        value = _fraction(self.run.test, "clean_accuracy")
        if value is None and self.certification is not None:
            return self.certification.summary.clean_accuracy
        return value

    @property
    def clean_from_certify(self) -> bool:
        return _fraction(self.run.test, "clean_accuracy") is None and self.clean is not None

    @property
    def pgd(self) -> float | None:
        return _fraction(self.run.test, "pgd_accuracy")

    @property
    def train_verified(self) -> float | None:
        """Training-time verified accuracy (IBP or CROWN-IBP bounds, ``test_metrics.json``)."""
        return _fraction(self.run.test, "verified_accuracy")

    @property
    def certified(self) -> float | None:
        return None if self.certification is None else (
            self.certification.summary.certified_accuracy)

    @property
    def not_falsified(self) -> float | None:
        return None if self.certification is None else (
            self.certification.summary.adversarial_accuracy)

    @property
    def train_seconds(self) -> float | None:
        """Sum of the epochs' training time (``epoch_seconds``; evaluation not included)."""
        times = [row.get("epoch_seconds", math.nan) for row in self.run.epochs]
        finite = [t for t in times if math.isfinite(t)]
        return sum(finite) if finite else None

    def sort_key(self) -> tuple[Any, ...]:
        label = self.label
        if isinstance(label, (int, float)) and not isinstance(label, bool):
            label_key: tuple[int, float, str] = (0, float(label), "")
        elif label is None:
            label_key = (2, 0.0, "")
        else:
            label_key = (1, 0.0, str(label))
        certification = "" if self.certification is None else str(self.certification.path)
        return (self.run.method, self.run.model, label_key, self.run.name, certification)


def group_rows(runs: Sequence[Run], label_key: str | None) -> dict[Setting, list[Row]]:
    """Rows by setting (sorted by data set, then eps), each list sorted by method, model,
    label, run and certification directory."""
    groups: dict[Setting, list[Row]] = {}
    for run in runs:
        label = None if label_key is None else lookup(run.config, label_key, None)
        if isinstance(label, (dict, list)):
            label = str(label)
        certifications: Sequence[Certification | None] = run.certifications or (None,)
        for certification in certifications:
            eps = run.test_eps if certification is None else certification.eps
            setting = Setting(run.dataset, eps)
            groups.setdefault(setting, []).append(Row(run, certification, label))
    return {setting: sorted(groups[setting], key=Row.sort_key) for setting in sorted(groups)}
