"""tightrope.losses: certified-training losses built from tightrope.bounds and tightrope.attacks.

Every loss is a frozen callable ``loss(model, x, y, eps) -> LossOutput(loss, logits, metrics)``
(the :class:`CertifiedLoss` protocol) built from a frozen config whose defaults are the paper's
settings; randomised losses hold a ``torch.Generator`` (never global seeding). ``x: (B, *S)``
in ``[0, 1]``, ``y: (B,)`` labels, ``eps`` the l_inf radius in pixel units.

* :class:`StandardLoss` — natural cross-entropy;
* :class:`PGDTrainingLoss` — PGD adversarial training (Madry et al. 2018);
* :class:`IBPLoss` — robust cross-entropy of IBP margin bounds (Gowal et al. 2018);
* :class:`CROWNIBPLoss` — the ``beta`` mix of CROWN-IBP and IBP bounds with natural weight
  ``kappa`` (Zhang et al. 2020);
* :class:`SABRLoss` — IBP on a small box around a PGD point (Mueller et al. 2023);
* :class:`TAPSLoss`, :class:`STAPSLoss` — IBP to a split layer, per-class PGD estimators in
  the latent box and a gradient connector, times the IBP loss (Mao et al. 2023);
  :func:`resolve_split` — the layer index where TAPS splits a model (for evaluation);
* :class:`LeeLoss` — CROWN-IBP with 0/1 lower slopes from one signed-gradient step
  (Lee et al. 2021);
* :class:`WongKolterLoss` — robust training with the dual network's bound (Wong & Kolter 2018);
* :class:`Regularized`, :func:`ibp_initialize`, :class:`WarmupLoss` — Shi et al. 2021's
  initialisation and regularisers (also in the natural warm-up, on a 1e-6 box), and L1;
* :class:`CCIBPLoss`, :class:`MTLIBPLoss`, :class:`ExpIBPLoss` — the expressive losses
  (De Palma et al. 2024), with random-start FGSM or PGD in a ball of ``attack_eps_factor`` eps;
* :data:`METHODS` / :func:`build_loss` — the registry of method names, with each paper's
  model-selection rule (:class:`ModelSelection`);
* :class:`BatchNormPolicy` — which batch normalises the adversarial and bound passes (default:
  the clean batch, the CTBench convention).

Example::

    import torch
    from tightrope.losses import MTLIBPConfig, MTLIBPLoss

    loss = MTLIBPLoss(MTLIBPConfig(alpha=0.5), generator=torch.Generator().manual_seed(0))
    out = loss(model, x, y, eps=8 / 255)
    out.loss.backward()
    out.metrics["ibp_verified_accuracy"]
"""

from tightrope.losses.__about__ import __version__
from tightrope.losses.adversarial import PGDTrainingConfig, PGDTrainingLoss
from tightrope.losses.batchnorm import BatchNormPolicy, clean_pass
from tightrope.losses.cc_ibp import CCIBPConfig, CCIBPLoss
from tightrope.losses.core import CertifiedLoss, LossOutput, logit_margins, robust_cross_entropy
from tightrope.losses.crown_ibp import CROWNIBPConfig, CROWNIBPLoss
from tightrope.losses.exp_ibp import ExpIBPConfig, ExpIBPLoss
from tightrope.losses.expressive import (
    ExpressiveAttack,
    expressive_attack,
    expressive_pgd_attack,
)
from tightrope.losses.interval import IBPConfig, IBPLoss
from tightrope.losses.lee import LeeConfig, LeeLoss, signed_step_slopes
from tightrope.losses.mtl_ibp import MTLIBPConfig, MTLIBPLoss
from tightrope.losses.registry import METHODS, Method, build_loss
from tightrope.losses.regularizers import (
    Regularized,
    RegularizerConfig,
    WarmupConfig,
    WarmupLoss,
    ibp_initialize,
    l1_penalty,
    relu_balance_penalty,
    tightness_penalty,
)
from tightrope.losses.sabr import SABRConfig, SABRLoss, SmallBoxRadius, small_box
from tightrope.losses.selection import ModelSelection
from tightrope.losses.standard import StandardConfig, StandardLoss
from tightrope.losses.staps import STAPSConfig, STAPSLoss
from tightrope.losses.taps import (
    TAPSBounds,
    TAPSConfig,
    TAPSLoss,
    gradient_connector,
    resolve_split,
    scale_gradient,
    taps_bounds,
)
from tightrope.losses.wong_kolter import WongKolterConfig, WongKolterLoss

__all__ = [
    "METHODS",
    "BatchNormPolicy",
    "CCIBPConfig",
    "CCIBPLoss",
    "CROWNIBPConfig",
    "CROWNIBPLoss",
    "CertifiedLoss",
    "ExpIBPConfig",
    "ExpIBPLoss",
    "ExpressiveAttack",
    "IBPConfig",
    "IBPLoss",
    "LeeConfig",
    "LeeLoss",
    "LossOutput",
    "MTLIBPConfig",
    "MTLIBPLoss",
    "Method",
    "ModelSelection",
    "PGDTrainingConfig",
    "PGDTrainingLoss",
    "Regularized",
    "RegularizerConfig",
    "SABRConfig",
    "SABRLoss",
    "STAPSConfig",
    "STAPSLoss",
    "SmallBoxRadius",
    "StandardConfig",
    "StandardLoss",
    "TAPSBounds",
    "TAPSConfig",
    "TAPSLoss",
    "WarmupConfig",
    "WarmupLoss",
    "WongKolterConfig",
    "WongKolterLoss",
    "__version__",
    "build_loss",
    "clean_pass",
    "expressive_attack",
    "expressive_pgd_attack",
    "gradient_connector",
    "ibp_initialize",
    "l1_penalty",
    "logit_margins",
    "relu_balance_penalty",
    "resolve_split",
    "robust_cross_entropy",
    "scale_gradient",
    "signed_step_slopes",
    "small_box",
    "taps_bounds",
    "tightness_penalty",
]
