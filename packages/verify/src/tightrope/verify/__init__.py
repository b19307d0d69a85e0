"""tightrope.verify: certification of l_inf robustness (cascade, BaB, ONNX/VNNLIB).

Work in progress: today it holds the specification types (:mod:`tightrope.verify.spec`).
"""

from tightrope.verify.__about__ import __version__
from tightrope.verify.cascade import verify
from tightrope.verify.config import (
    BabConfig,
    Branching,
    InputSplit,
    Mode,
    SearchOrder,
    VerifierConfig,
)
from tightrope.verify.result import Stage, Verdict
from tightrope.verify.spec import (
    Region,
    Specification,
    UnsafeSet,
    VerifyStatus,
    robustness_spec,
)

__all__ = [
    "BabConfig",
    "Branching",
    "InputSplit",
    "Mode",
    "Region",
    "SearchOrder",
    "Specification",
    "Stage",
    "UnsafeSet",
    "Verdict",
    "VerifierConfig",
    "VerifyStatus",
    "__version__",
    "robustness_spec",
    "verify",
]
