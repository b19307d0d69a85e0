"""tightrope.losses: certified-training losses (IBP, CROWN-IBP, SABR, TAPS, CC-/MTL-/Exp-IBP, ...).

Not implemented yet: this package holds only its skeleton.
"""

from tightrope.losses.__about__ import __version__

__all__ = ["__version__"]
