"""tightrope.train: certified training (models, data, schedules, trainer, checkpoints).

Not implemented yet: this package holds only its skeleton.
"""

from tightrope.train.__about__ import __version__

__all__ = ["__version__"]
