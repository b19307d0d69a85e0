"""Method names -> (config class, loss factory), for the apps that build a loss from a config.

Example::

    method = METHODS["mtl_ibp"]
    config = method.config_type(alpha=0.5)
    loss = method.build(config, torch.Generator().manual_seed(0))
    out = loss(model, x, y, eps)

    # TAPS and STAPS train another loss while eps grows (Mao et al. 2023):
    ramp_loss = METHODS["staps"].build_ramp(STAPSConfig(shrink=0.4), generator)  # SABR
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
from tightrope.losses.selection import ModelSelection
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
        ramp: ``(config, generator) -> CertifiedLoss``, the loss the method's paper trains
            with while eps grows, built from the method's own config; ``None`` when that is
            the method's loss itself. TAPS: IBP on the eps box; STAPS: IBP on its small box,
            i.e. SABR (the TAPS reference's ``use_vanilla_ibp`` phase).
        selection: the paper's model-selection rule, which epoch of a run is its result (see
            :class:`ModelSelection`; ``LAST`` unless the paper's code keeps a best epoch).
    """

    config_type: type[Any]
    build: Callable[[Any, torch.Generator | None], CertifiedLoss]
    ramp: Callable[[Any, torch.Generator | None], CertifiedLoss] | None = None
    selection: ModelSelection = ModelSelection.LAST

    def default(self, generator: torch.Generator | None = None) -> CertifiedLoss:
        """The loss with the paper's default settings."""
        return self.build(self.config_type(), generator)

    def build_ramp(self, config: Any, generator: torch.Generator | None) -> CertifiedLoss:
        """The loss for the eps ramp-up under ``config`` (see ``ramp``)."""
        return (self.build if self.ramp is None else self.ramp)(config, generator)


Build = Callable[[Any, torch.Generator | None], CertifiedLoss]


def _checked(config_type: type[Any], build: Build, ramp: Build | None = None, *,
             selection: ModelSelection = ModelSelection.LAST) -> Method:
    def checked(make: Build) -> Build:
        def checked_build(config: Any, generator: torch.Generator | None) -> CertifiedLoss:
            if not isinstance(config, config_type):
                raise TypeError(
                    f"expected a {config_type.__name__}, got {type(config).__name__}"
                )
            return make(config, generator)

        return checked_build

    return Method(config_type, checked(build), None if ramp is None else checked(ramp),
                  selection)


def _taps_ramp(config: TAPSConfig, generator: torch.Generator | None) -> CertifiedLoss:
    # IBP on the eps box; with an unstable-ReLU shrink, SABR's shrunk IBP on it (shrink 1 runs
    # no attack), as the reference applies the shrink in every phase.
    if config.relu_shrink == 1.0:
        return IBPLoss(IBPConfig(batchnorm=config.batchnorm))
    return SABRLoss(SABRConfig(shrink=1.0, batchnorm=config.batchnorm,
                               relu_shrink=config.relu_shrink), generator)


# Shi et al. 2021's and Zhang et al. 2020's code keep the best verified epoch.
_BEST_VERIFIED = ModelSelection.BEST_VERIFIED

METHODS: Mapping[str, Method] = MappingProxyType({
    "standard": _checked(StandardConfig, lambda c, g: StandardLoss(c)),
    "pgd": _checked(PGDTrainingConfig, lambda c, g: PGDTrainingLoss(c, g)),
    "ibp": _checked(IBPConfig, lambda c, g: IBPLoss(c), selection=_BEST_VERIFIED),
    "crown_ibp": _checked(CROWNIBPConfig, lambda c, g: CROWNIBPLoss(c),
                          selection=_BEST_VERIFIED),
    "lee": _checked(LeeConfig, lambda c, g: LeeLoss(c), selection=_BEST_VERIFIED),
    "wong_kolter": _checked(WongKolterConfig, lambda c, g: WongKolterLoss(c)),
    "sabr": _checked(SABRConfig, lambda c, g: SABRLoss(c, g)),
    "cc_ibp": _checked(CCIBPConfig, lambda c, g: CCIBPLoss(c, g)),
    "mtl_ibp": _checked(MTLIBPConfig, lambda c, g: MTLIBPLoss(c, g)),
    "exp_ibp": _checked(ExpIBPConfig, lambda c, g: ExpIBPLoss(c, g)),
    "taps": _checked(TAPSConfig, lambda c, g: TAPSLoss(c, g), _taps_ramp,
                     selection=ModelSelection.BEST_TAPS),
    "staps": _checked(STAPSConfig, lambda c, g: STAPSLoss(c, g),
                      lambda c, g: SABRLoss(c.ramp_config(), g),
                      selection=ModelSelection.BEST_TAPS),
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
