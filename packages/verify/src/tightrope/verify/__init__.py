"""tightrope.verify: Certification of l_inf robustness: bound cascade, branch-and-bound, ONNX/VNNLIB front end.

Not implemented yet: this package holds only its skeleton.
"""

from tightrope.verify.__about__ import __version__

__all__ = ["__version__"]
