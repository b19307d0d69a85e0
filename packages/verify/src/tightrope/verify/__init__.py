"""tightrope.verify: certification of l_inf robustness (cascade, BaB, ONNX/VNNLIB).

Work in progress: today it holds the specification types (:mod:`tightrope.verify.spec`).
"""

from tightrope.verify.__about__ import __version__
from tightrope.verify.spec import (
    Region,
    Specification,
    UnsafeSet,
    VerifyStatus,
    robustness_spec,
)

__all__ = [
    "Region",
    "Specification",
    "UnsafeSet",
    "VerifyStatus",
    "__version__",
    "robustness_spec",
]
