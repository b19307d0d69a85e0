"""tightrope.attacks: adversarial attacks for robustness evaluation and certified training.

Every attack works on any ``nn.Module`` returning ``(B, K)`` logits, in input space with points
clipped to the eps ball ∩ the domain ``[0, 1]`` (or to a given box); it restores the model's
train/eval modes and ``requires_grad`` flags, leaves no parameter gradients, draws randomness
only from a passed ``torch.Generator`` and works batched on CPU and CUDA in float32/float64.

* :func:`fgsm` — one signed step, optionally from a random start (Goodfellow et al. 2015);
* :func:`pgd` — PGD with restarts on still-robust samples and step schedules (Madry 2018);
* :func:`apgd` — step-size-adaptive PGD with CE or DLR (Croce & Hein 2020), the default
  evaluation attack;
* :func:`box_pgd`, :func:`multi_estimator_box_pgd` — PGD in an arbitrary per-sample box and
  TAPS's one-estimator-per-class variant (Mao et al. 2023);
* :mod:`tightrope.attacks.checks` — warnings about evaluation mistakes.

Example::

    import torch
    from tightrope.attacks import APGDConfig, Objective, apgd

    g = torch.Generator().manual_seed(0)
    result = apgd(model, x, y, eps=8 / 255,
                  config=APGDConfig(steps=100, objective=Objective.DLR), generator=g)
    robust_accuracy = result.robust.float().mean()
"""

from tightrope.attacks.__about__ import __version__
from tightrope.attacks.auto_pgd import APGDConfig, apgd, apgd_checkpoints
from tightrope.attacks.box import (
    BoxPGDConfig,
    MultiEstimatorConfig,
    MultiEstimatorResult,
    box_pgd,
    multi_estimator_box_pgd,
)
from tightrope.attacks.checks import (
    EvaluationWarning,
    check_determinism,
    check_input_gradients,
    check_model,
    check_outputs,
)
from tightrope.attacks.core import (
    Attack,
    AttackResult,
    ModelMode,
    Objective,
    fold_batchnorm,
    frozen_model,
    margins,
    objective_values,
)
from tightrope.attacks.fast_gradient import FGSMConfig, fgsm
from tightrope.attacks.projected_gradient import PGDConfig, pgd
from tightrope.attacks.schedules import ConstantStep, CosineStep, MultiStepDecay, StepSchedule

__all__ = [
    "APGDConfig",
    "Attack",
    "AttackResult",
    "BoxPGDConfig",
    "ConstantStep",
    "CosineStep",
    "EvaluationWarning",
    "FGSMConfig",
    "ModelMode",
    "MultiEstimatorConfig",
    "MultiEstimatorResult",
    "MultiStepDecay",
    "Objective",
    "PGDConfig",
    "StepSchedule",
    "__version__",
    "apgd",
    "apgd_checkpoints",
    "box_pgd",
    "check_determinism",
    "check_input_gradients",
    "check_model",
    "check_outputs",
    "fgsm",
    "fold_batchnorm",
    "frozen_model",
    "margins",
    "multi_estimator_box_pgd",
    "objective_values",
    "pgd",
]
