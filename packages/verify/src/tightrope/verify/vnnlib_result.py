"""VNN-COMP result files: the answer, and for ``sat`` the counterexample.

The format (VNN-COMP 2022 onwards) is one status word — ``unsat`` (the property holds), ``sat``
(it is violated), ``timeout`` or ``unknown`` — and, after ``sat``, an s-expression listing a
value for every input and output::

    sat
    ((X_0 0.25)
     (X_1 -0.5)
     (Y_0 3.75))

Values are written with Python's shortest round-tripping float repr, so reading the file back
gives the very float64 numbers that were checked.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from tightrope.verify.spec import VerifyStatus

__all__ = ["VnnResult", "format_result", "parse_result", "status_word"]

_WORDS = {
    VerifyStatus.VERIFIED: "unsat",
    VerifyStatus.FALSIFIED: "sat",
    VerifyStatus.TIMEOUT: "timeout",
    VerifyStatus.UNKNOWN: "unknown",
}
_STATUSES = {word: status for status, word in _WORDS.items()}
# VNN-COMP 2021 wrote "holds" / "violated"; read them too.
_STATUSES.update({"holds": VerifyStatus.VERIFIED, "violated": VerifyStatus.FALSIFIED})
_ASSIGNMENT = re.compile(r"\(\s*([XY])_(\d+)\s+([^\s()]+)\s*\)")


def status_word(status: VerifyStatus) -> str:
    """The VNN-COMP word for ``status``: ``unsat``, ``sat``, ``timeout`` or ``unknown``."""
    return _WORDS[status]


@dataclass(frozen=True, slots=True)
class VnnResult:
    """A parsed result file: the status and, for ``sat``, the flat input and output values."""

    status: VerifyStatus
    inputs: tuple[float, ...] = ()
    outputs: tuple[float, ...] = ()

    def input_tensor(self, shape: tuple[int, ...]) -> Tensor:
        """The counterexample as a float64 tensor of shape ``(1, *shape)``."""
        return torch.tensor(self.inputs, dtype=torch.float64).reshape(1, *shape)


def format_result(
    status: VerifyStatus, x: Tensor | None = None, y: Tensor | None = None
) -> str:
    """The text of a result file.

    Args:
        status: the answer; ``FALSIFIED`` needs ``x`` and ``y``.
        x: the counterexample input, any shape (flattened row-major: ``X_i``).
        y: the network's output on ``x`` (flattened: ``Y_j``).
    """
    word = status_word(status)
    if status is not VerifyStatus.FALSIFIED:
        return word + "\n"
    if x is None or y is None:
        raise ValueError("a sat result needs the counterexample input x and its output y")
    entries = [f"(X_{i} {float(v)!r})" for i, v in enumerate(x.detach().reshape(-1).tolist())]
    entries += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(y.detach().reshape(-1).tolist())]
    return word + "\n(" + "\n ".join(entries) + ")\n"


def parse_result(text: str, *, source: str = "<result>") -> VnnResult:
    """Read a result file's text back.

    Raises:
        ValueError: for an unknown status word, or a ``sat`` whose assignments are missing,
            duplicated, not numbered from 0, or not finite numbers.
    """
    stripped = text.strip()
    word = stripped.split(None, 1)[0].lower() if stripped else ""
    if word not in _STATUSES:
        raise ValueError(f"{source}: unknown result {word!r}; expected one of "
                         f"{sorted(_STATUSES)}")
    status = _STATUSES[word]
    if status is not VerifyStatus.FALSIFIED:
        return VnnResult(status)
    values: dict[str, dict[int, float]] = {"X": {}, "Y": {}}
    for kind, index, number in _ASSIGNMENT.findall(stripped[len(word):]):
        try:
            value = float(number)
        except ValueError:
            raise ValueError(f"{source}: {kind}_{index} has value {number!r}, not a "
                             "number") from None
        if not math.isfinite(value):
            raise ValueError(f"{source}: {kind}_{index} = {number} is not finite")
        if int(index) in values[kind]:
            raise ValueError(f"{source}: {kind}_{index} is assigned twice")
        values[kind][int(index)] = value
    flat: dict[str, tuple[float, ...]] = {}
    for kind, assigned in values.items():
        if sorted(assigned) != list(range(len(assigned))) or not assigned:
            raise ValueError(f"{source}: a sat result needs {kind}_0 ... {kind}_(n-1), got "
                             f"{len(assigned)} values with gaps or none")
        flat[kind] = tuple(assigned[i] for i in range(len(assigned)))
    return VnnResult(status, flat["X"], flat["Y"])
