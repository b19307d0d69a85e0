"""What the verifier answers: a :class:`Verdict` and the :class:`Stage` that decided it."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import Tensor

from tightrope.verify.spec import VerifyStatus

__all__ = ["Stage", "Verdict"]


class Stage(enum.Enum):
    """The step of the cascade that decided an answer (``NONE``: nothing decided)."""

    CLEAN = "clean"
    ATTACK = "attack"
    IBP = "ibp"
    CROWN = "crown"
    ALPHA_CROWN = "alpha_crown"
    STRONG_ATTACK = "strong_attack"
    BAB = "bab"
    MILP = "milp"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Verdict:
    """One verification answer.

    Attributes:
        status: ``VERIFIED`` only from sound bounds; ``FALSIFIED`` only with ``counterexample``.
        counterexample: ``(1, *S_in)`` input inside a region whose float64 forward pass lands
            in an unsafe set (only with ``FALSIFIED``), in the model's dtype.
        output: ``(1, n_out)`` float64 model output at ``counterexample``.
        stage: the cascade step that decided (``Stage.NONE`` for UNKNOWN/TIMEOUT).
        seconds: wall time of the call.
        domains: subdomains bounded by branch-and-bound (0 when it did not run).
    """

    status: VerifyStatus
    stage: Stage
    seconds: float
    counterexample: Tensor | None = None
    output: Tensor | None = None
    domains: int = 0
