"""Method names -> (config class, loss factory), for the apps that build a loss from a config.

Example::

    method = METHODS["mtl_ibp"]
    config = method.config_type(alpha=0.5)
    loss = method.build(config, torch.Generator().manual_seed(0))
    out = loss(model, x, y, eps)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from tightrope.losses.adversarial import PGDTrainingConfig, PGDTrainingLoss
from tightrope.losses.cc_ibp import CCIBPConfig, CCIBPLoss
from tightrope.losses.core import CertifiedLoss
from tightrope.losses.crown_ibp import CROWNIBPConfig, CROWNIBPLoss
from tightrope.losses.exp_ibp import ExpIBPConfig, ExpIBPLoss
from tightrope.losses.interval import IBPConfig, IBPLoss
from tightrope.losses.lee import LeeConfig, LeeLoss
from tightrope.losses.mtl_ibp import MTLIBPConfig, MTLIBPLoss
from tightrope.losses.sabr import SABRConfig, SABRLoss
from tightrope.losses.standard import StandardConfig, StandardLoss
from tightrope.losses.staps import STAPSConfig, STAPSLoss
from tightrope.losses.taps import TAPSConfig, TAPSLoss
from tightrope.losses.wong_kolter import WongKolterConfig, WongKolterLoss

__all__ = ["METHODS", "Method", "build_loss"]


@dataclass(frozen=True, slots=True)
class Method:
    """One registered method.

    Attributes:
        config_type: its frozen config class (defaults = the paper's settings).
        build: ``(config, generator) -> CertifiedLoss``; deterministic methods ignore the
            generator, randomised ones draw every random number from it.
    """

    config_type: type[Any]
    build: Callable[[Any, torch.Generator | None], CertifiedLoss]

    def default(self, generator: torch.Generator | None = None) -> CertifiedLoss:
        """The loss with the paper's default settings."""
        return self.build(self.config_type(), generator)


def _checked(config_type: type[Any], build: Callable[[Any, torch.Generator | None],
             CertifiedLoss]) -> Method:
    def checked_build(config: Any, generator: torch.Generator | None) -> CertifiedLoss:
        if not isinstance(config, config_type):
            raise TypeError(
                f"expected a {config_type.__name__}, got {type(config).__name__}"
            )
        return build(config, generator)

    return Method(config_type, checked_build)


METHODS: Mapping[str, Method] = MappingProxyType({
    "standard": _checked(StandardConfig, lambda c, g: StandardLoss(c)),
    "pgd": _checked(PGDTrainingConfig, lambda c, g: PGDTrainingLoss(c, g)),
    "ibp": _checked(IBPConfig, lambda c, g: IBPLoss(c)),
    "crown_ibp": _checked(CROWNIBPConfig, lambda c, g: CROWNIBPLoss(c)),
    "lee": _checked(LeeConfig, lambda c, g: LeeLoss(c)),
    "wong_kolter": _checked(WongKolterConfig, lambda c, g: WongKolterLoss(c)),
    "sabr": _checked(SABRConfig, lambda c, g: SABRLoss(c, g)),
    "cc_ibp": _checked(CCIBPConfig, lambda c, g: CCIBPLoss(c, g)),
    "mtl_ibp": _checked(MTLIBPConfig, lambda c, g: MTLIBPLoss(c, g)),
    "exp_ibp": _checked(ExpIBPConfig, lambda c, g: ExpIBPLoss(c, g)),
    "taps": _checked(TAPSConfig, lambda c, g: TAPSLoss(c, g)),
    "staps": _checked(STAPSConfig, lambda c, g: STAPSLoss(c, g)),
})


def build_loss(
    name: str, config: Any = None, generator: torch.Generator | None = None
) -> CertifiedLoss:
    """The loss registered as ``name`` with ``config`` (default: the paper's settings).

    Raises:
        ValueError: for an unknown name, listing the known ones.
        TypeError: when ``config`` is not the method's config class.
    """
    if name not in METHODS:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(sorted(METHODS))}")
    method = METHODS[name]
    return method.build(method.config_type() if config is None else config, generator)
