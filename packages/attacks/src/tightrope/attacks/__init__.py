"""tightrope.attacks: Adversarial attacks for robustness evaluation and certified training: FGSM, PGD, APGD, box PGD.

Not implemented yet: this package holds only its skeleton.
"""

from tightrope.attacks.__about__ import __version__

__all__ = ["__version__"]
