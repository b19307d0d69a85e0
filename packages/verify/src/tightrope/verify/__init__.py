"""tightrope.verify: certification of l_inf robustness (cascade, BaB, ONNX/VNNLIB).

Work in progress: today it holds the specification types (:mod:`tightrope.verify.spec`).

* :func:`load_onnx`, :func:`load_vnnlib` — a VNN-COMP instance's network and property;
* :func:`format_result`, :func:`parse_result`, :func:`status_word` — VNN-COMP result files and
  the word (``unsat``, ``sat``, ``timeout``, ``unknown``) for a :class:`VerifyStatus`.
"""

from tightrope.verify.__about__ import __version__
from tightrope.verify.cascade import verify
from tightrope.verify.certify import Certification, certify
from tightrope.verify.config import (
    BabConfig,
    Branching,
    InputSplit,
    LayerOrder,
    Mode,
    SearchOrder,
    VerifierConfig,
)
from tightrope.verify.onnx import OnnxImportError, OnnxModel, export_onnx, load_onnx
from tightrope.verify.result import Stage, Verdict
from tightrope.verify.spec import (
    Region,
    Specification,
    UnsafeSet,
    VerifyStatus,
    robustness_spec,
)
from tightrope.verify.vnnlib import VnnlibError, load_vnnlib, parse_vnnlib
from tightrope.verify.vnnlib_result import VnnResult, format_result, parse_result, status_word

__all__ = [
    "BabConfig",
    "Branching",
    "Certification",
    "InputSplit",
    "LayerOrder",
    "Mode",
    "OnnxImportError",
    "OnnxModel",
    "Region",
    "SearchOrder",
    "Specification",
    "Stage",
    "UnsafeSet",
    "Verdict",
    "VerifierConfig",
    "VerifyStatus",
    "VnnResult",
    "VnnlibError",
    "__version__",
    "certify",
    "export_onnx",
    "format_result",
    "load_onnx",
    "load_vnnlib",
    "parse_result",
    "parse_vnnlib",
    "robustness_spec",
    "status_word",
    "verify",
]
