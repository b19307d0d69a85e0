"""tightrope.verify: certification of l_inf robustness (cascade, BaB, ONNX/VNNLIB).

Not implemented yet: this package holds only its skeleton.
"""

from tightrope.verify.__about__ import __version__

__all__ = ["__version__"]
