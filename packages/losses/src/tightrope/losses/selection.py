"""Which epoch of a training run is its result: each method's paper's model-selection rule.

The rule belongs to the method (its registry entry, ``METHODS[name].selection``, holds the
paper's); ``tightrope.train`` applies it on the validation split once eps has reached its final
value and records which rule a run used.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["ModelSelection"]


class ModelSelection(Enum):
    """How a training run picks the epoch it keeps (``best.pt``).

    * ``LAST`` — the last epoch. SABR (eth-sri/SABR saves the final network), the expressive
      losses CC-/MTL-/Exp-IBP (alessandrodepalma/expressive-losses keeps ``ckpt_last``), PGD
      training and standard training.
    * ``BEST_VERIFIED`` — the epoch with the highest verified accuracy (IBP or CROWN-IBP bounds)
      on the validation split, ties broken by clean accuracy. Shi et al. 2021
      (shizhouxing/Fast-Certified-Robust-Training: lowest verified error once eps is full) and
      Zhang et al. 2020 (huanzhang12/CROWN-IBP): IBP, CROWN-IBP and the methods built on them.
    * ``BEST_TAPS`` — the epoch with the highest TAPS-estimated accuracy on the validation
      split, ties broken by clean accuracy (eth-sri/TAPS ``mix_train.py``): TAPS and STAPS.
    """

    LAST = "last"
    BEST_VERIFIED = "best_verified"
    BEST_TAPS = "best_taps"

    @property
    def metric(self) -> str | None:
        """The validation metric the rule maximises (``None`` for ``LAST``)."""
        return {ModelSelection.LAST: None, ModelSelection.BEST_VERIFIED: "verified_accuracy",
                ModelSelection.BEST_TAPS: "taps_accuracy"}[self]
