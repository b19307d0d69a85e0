"""The published training recipes that the paper configs in ``configs/`` must match.

One entry per (setting, method): the values of the authors' own commands (READMEs and scripts)
converted to our units, with the source named. ``tests/test_train_configs.py`` checks every
paper config against this table. Conventions:

* epochs count from 0; ``milestones`` are the epochs from which the learning rate is decayed
  (what PyTorch's ``MultiStepLR`` does when stepped after each epoch, as Shi et al.'s, TAPS's and
  the expressive-losses code do; SABR steps it before each epoch, so its decay comes one epoch
  earlier than its flags, which are what is recorded here).
* ``warmup``: natural epochs before the ramp; ``ramp``: epochs over which eps grows.
* ``l1``: the weight of our ``sum |W|`` over conv/linear weights. TAPS divides its sum by the
  number of conv/linear layers (7 in CNN7), so its ``--L1-reg`` is divided by 7 here.
* ``loss``: attribute paths into the method's loss config (``taps.relu_shrink``) and the value
  expected there; a class means "an instance of it".
* ``kappa``/``beta``: the resolved CROWN-IBP schedules (``TrainConfig.kappa_schedule``/
  ``beta_schedule``), ``None`` when the method has none.

``CPU_MNIST`` derives the CPU-scale MNIST configs (``configs/mnist_cpu``) from these entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from tightrope.attacks import ConstantStep, FGSMConfig, PGDConfig

__all__ = ["CPU_MNIST", "CPU_MNIST_MODEL", "CPU_MNIST_SCHEDULE", "CPU_MNIST_SETTINGS", "PUBLISHED",
           "Recipe"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Recipe:
    """One published training recipe in our config's terms."""

    source: str
    epochs: int
    warmup: int
    ramp: int
    milestones: tuple[int, ...]
    train_eps: float
    batch_size: int
    grad_clip: float
    shi_lambda: float
    l1: float
    ibp_init: bool = True
    loss: Mapping[str, Any] = field(default_factory=dict)
    beta: tuple[float, float] | None = None
    kappa: tuple[float, float] | None = None


SHI = "shizhouxing/Fast-Certified-Robust-Training README"
SABR = "eth-sri/SABR README"
TAPS_MNIST = "eth-sri/TAPS scripts/train_mnist"
TAPS_CIFAR = "eth-sri/TAPS scripts/train_cifar"
TAPS_TIN = "eth-sri/TAPS scripts/train_tinyimagenet"
EXPRESSIVE = "alessandrodepalma/expressive-losses README (Reproducing Table 1)"
MADRY = "baseline: Madry et al. 2018's attack on the shared schedule (no CNN7 recipe published)"

# Schedules shared by several entries (keyword arguments given later override these).
_SHI_MNIST = partial(Recipe, source=SHI, epochs=70, warmup=0, ramp=20, milestones=(50, 60),
                     batch_size=256, grad_clip=10.0, shi_lambda=0.5, l1=0.0)
_SHI_CIFAR = partial(Recipe, source=SHI, epochs=160, warmup=1, ramp=80, milestones=(120, 140),
                     batch_size=128, grad_clip=10.0, shi_lambda=0.5, l1=0.0)
_SHI_TIN = partial(Recipe, source=SHI, epochs=80, warmup=1, ramp=20, milestones=(61, 71),
                   batch_size=128, grad_clip=10.0, shi_lambda=0.2, l1=0.0)
_SABR_MNIST = partial(Recipe, source=SABR, epochs=70, warmup=1, ramp=20, milestones=(50, 60),
                      batch_size=256, grad_clip=0.0, shi_lambda=0.5)
_SABR_CIFAR = partial(Recipe, source=SABR, epochs=160, warmup=1, ramp=80,
                      milestones=(120, 140), batch_size=128, grad_clip=0.0, shi_lambda=0.5)
_SABR_LONG = partial(Recipe, source=SABR, epochs=180, warmup=1, ramp=80, milestones=(140, 160),
                     batch_size=128, grad_clip=0.0, shi_lambda=0.5)
_TAPS_MNIST = partial(Recipe, source=TAPS_MNIST, epochs=70, warmup=0, ramp=20,
                      milestones=(50, 60), batch_size=256, grad_clip=10.0, shi_lambda=0.5)
_TAPS_CIFAR = partial(Recipe, source=TAPS_CIFAR, epochs=161, warmup=1, ramp=80,
                      milestones=(121, 141), batch_size=128, grad_clip=10.0, shi_lambda=0.5,
                      l1=2e-6 / 7)
_TAPS_TIN = partial(Recipe, source=TAPS_TIN, epochs=80, warmup=1, ramp=20, milestones=(60, 70),
                    batch_size=128, grad_clip=10.0, shi_lambda=0.1)
_EXP_MNIST = partial(Recipe, source=EXPRESSIVE, epochs=70, warmup=0, ramp=20,
                     milestones=(50, 60), batch_size=256, grad_clip=10.0, shi_lambda=0.5)
_EXP_CIFAR = partial(Recipe, source=EXPRESSIVE, epochs=160, warmup=1, ramp=80,
                     milestones=(120, 140), batch_size=128, grad_clip=10.0, shi_lambda=0.5)
_EXP_CIFAR_LONG = partial(Recipe, source=EXPRESSIVE, epochs=260, warmup=1, ramp=80,
                          milestones=(180, 220), batch_size=128, grad_clip=10.0, shi_lambda=0.5)
_EXP_TIN = partial(Recipe, source=EXPRESSIVE, epochs=160, warmup=1, ramp=80,
                   milestones=(120, 140), batch_size=128, grad_clip=10.0, shi_lambda=0.2,
                   l1=5e-5)
_PGD_MNIST = partial(Recipe, source=MADRY, epochs=70, warmup=0, ramp=0, milestones=(50, 60),
                     batch_size=256, grad_clip=10.0, shi_lambda=0.0, l1=0.0, ibp_init=False)
_PGD_OTHER = partial(Recipe, source=MADRY, epochs=160, warmup=0, ramp=0,
                     milestones=(120, 140), batch_size=128, grad_clip=10.0, shi_lambda=0.0,
                     l1=0.0, ibp_init=False)

_BETA = (1.0, 0.0)  # CROWN-IBP's beta 1 -> 0 with eps (Shi's certified.py; Zhang: final-beta 0)
_KAPPA_MNIST = (1.0, 0.5)  # CROWN-IBP config/mnist_dm-large_*.json: robust_natural, final-kappa 0.5
# The expressive losses' default attack: random-start FGSM of 10 eps on the eps ball.
_FGSM = {"attack": FGSMConfig, "attack.step_size": 10.0, "attack_eps_factor": 1.0}
# CIFAR-10 2/255: --train_att_n_steps 8 --train_att_step_size 0.25 --attack_eps_factor 2.1.
_PGD8 = {"attack": PGDConfig, "attack.steps": 8, "attack.step_size": 0.25,
         "attack.early_stop": False, "attack_eps_factor": 2.1}
# Madry et al. on MNIST: 40 steps of 0.01 at eps 0.3, i.e. 1/30 of eps per step.
_MADRY_MNIST = {"attack.steps": 40, "attack.step_size": 1 / 30}
_MADRY_CIFAR = {"attack.steps": 7, "attack.step_size": 0.25}  # the loss's default
_TAPS_SPLIT = {"taps_gradient_scale": 5.0, "classifier_relus": 1}  # --alpha-box 5, blocks 17 4
_STAPS_SPLIT = {"taps.taps_gradient_scale": 5.0, "taps.classifier_relus": 1,
                "taps.relu_shrink": 1.0}

PUBLISHED: Mapping[tuple[str, str], Recipe] = {
    # MNIST eps = 0.1: trained at 0.2 (SABR at 0.1).
    ("mnist/eps0.1", "ibp"): _SHI_MNIST(train_eps=0.2),
    ("mnist/eps0.1", "crown_ibp"): _SHI_MNIST(train_eps=0.2, beta=_BETA, kappa=_KAPPA_MNIST),
    ("mnist/eps0.1", "sabr"): _SABR_MNIST(train_eps=0.1, l1=1e-5,
                                          loss={"shrink": 0.4, "relu_shrink": 1.0}),
    ("mnist/eps0.1", "taps"): _TAPS_MNIST(train_eps=0.2, l1=0.0, loss=_TAPS_SPLIT),
    # This STAPS command alone has no --init fast.
    ("mnist/eps0.1", "staps"): _TAPS_MNIST(train_eps=0.2, l1=2e-5 / 7, ibp_init=False,
                                           loss={"shrink": 0.4, **_STAPS_SPLIT}),
    ("mnist/eps0.1", "cc_ibp"): _EXP_MNIST(train_eps=0.2, l1=2e-6, loss={"alpha": 0.1, **_FGSM}),
    ("mnist/eps0.1", "mtl_ibp"): _EXP_MNIST(train_eps=0.2, l1=1e-5,
                                            loss={"alpha": 0.01, **_FGSM}),
    ("mnist/eps0.1", "pgd"): _PGD_MNIST(train_eps=0.1, loss=_MADRY_MNIST),
    # MNIST eps = 0.3: trained at 0.4 (SABR at 0.3; expressive losses x1.334 = 0.4002).
    ("mnist/eps0.3", "ibp"): _SHI_MNIST(train_eps=0.4),
    ("mnist/eps0.3", "crown_ibp"): _SHI_MNIST(train_eps=0.4, beta=_BETA, kappa=_KAPPA_MNIST),
    ("mnist/eps0.3", "sabr"): _SABR_MNIST(train_eps=0.3, l1=1e-6,
                                          loss={"shrink": 0.6, "relu_shrink": 1.0}),
    ("mnist/eps0.3", "taps"): _TAPS_MNIST(train_eps=0.4, l1=0.0, loss=_TAPS_SPLIT),
    ("mnist/eps0.3", "staps"): _TAPS_MNIST(train_eps=0.4, l1=2e-6 / 7,
                                           loss={"shrink": 0.6, **_STAPS_SPLIT}),
    ("mnist/eps0.3", "cc_ibp"): _EXP_MNIST(train_eps=0.4, l1=3e-6, loss={"alpha": 0.3, **_FGSM}),
    ("mnist/eps0.3", "mtl_ibp"): _EXP_MNIST(train_eps=0.4, l1=1e-6,
                                            loss={"alpha": 0.08, **_FGSM}),
    ("mnist/eps0.3", "pgd"): _PGD_MNIST(train_eps=0.3, loss=_MADRY_MNIST),
    # CIFAR-10 eps = 2/255.
    ("cifar10/eps2_255", "ibp"): _SHI_CIFAR(train_eps=2 / 255),
    ("cifar10/eps2_255", "crown_ibp"): _SHI_CIFAR(train_eps=2 / 255, beta=_BETA),
    ("cifar10/eps2_255", "sabr"): _SABR_CIFAR(train_eps=2 / 255, l1=1e-6,
                                              loss={"shrink": 0.1, "relu_shrink": 0.8}),
    # --block-sizes 4 17: five ReLU layers in the classifier.
    ("cifar10/eps2_255", "taps"): _TAPS_CIFAR(
        train_eps=2 / 255, loss={"taps_gradient_scale": 5.0, "classifier_relus": 5}),
    ("cifar10/eps2_255", "staps"): _TAPS_CIFAR(
        train_eps=2 / 255, loss={"shrink": 0.1, "taps.relu_shrink": 0.8,
                                 "taps.taps_gradient_scale": 2.0, "taps.classifier_relus": 1}),
    ("cifar10/eps2_255", "cc_ibp"): _EXP_CIFAR(train_eps=2 / 255, l1=3e-6,
                                               loss={"alpha": 0.01, **_PGD8}),
    ("cifar10/eps2_255", "mtl_ibp"): _EXP_CIFAR(train_eps=2 / 255, l1=3e-6,
                                                loss={"alpha": 0.004, **_PGD8}),
    ("cifar10/eps2_255", "exp_ibp"): _EXP_CIFAR(train_eps=2 / 255, l1=4e-6,
                                                loss={"alpha": 0.095, **_PGD8}),
    ("cifar10/eps2_255", "pgd"): _PGD_OTHER(train_eps=2 / 255, loss=_MADRY_CIFAR),
    # CIFAR-10 eps = 8/255.
    ("cifar10/eps8_255", "ibp"): _SHI_CIFAR(train_eps=8 / 255),
    ("cifar10/eps8_255", "crown_ibp"): _SHI_CIFAR(train_eps=8 / 255, beta=_BETA),
    ("cifar10/eps8_255", "sabr"): _SABR_LONG(train_eps=8 / 255, l1=0.0,
                                             loss={"shrink": 0.7, "relu_shrink": 1.0}),
    ("cifar10/eps8_255", "taps"): _TAPS_CIFAR(train_eps=8 / 255, loss=_TAPS_SPLIT),
    ("cifar10/eps8_255", "staps"): _TAPS_CIFAR(train_eps=8 / 255,
                                               loss={"shrink": 0.7, **_STAPS_SPLIT}),
    ("cifar10/eps8_255", "cc_ibp"): _EXP_CIFAR_LONG(train_eps=8 / 255, l1=0.0,
                                                    loss={"alpha": 0.5, **_FGSM}),
    ("cifar10/eps8_255", "mtl_ibp"): _EXP_CIFAR_LONG(train_eps=8 / 255, l1=1e-7,
                                                     loss={"alpha": 0.5, **_FGSM}),
    ("cifar10/eps8_255", "exp_ibp"): _EXP_CIFAR_LONG(train_eps=8 / 255, l1=0.0,
                                                     loss={"alpha": 0.5, **_FGSM}),
    ("cifar10/eps8_255", "pgd"): _PGD_OTHER(train_eps=8 / 255, loss=_MADRY_CIFAR),
    # TinyImageNet eps = 1/255.
    ("tiny_imagenet/eps1_255", "ibp"): _SHI_TIN(train_eps=1 / 255),
    ("tiny_imagenet/eps1_255", "crown_ibp"): _SHI_TIN(train_eps=1 / 255, beta=_BETA),
    ("tiny_imagenet/eps1_255", "sabr"): _SABR_LONG(train_eps=1 / 255, l1=1e-6,
                                                   loss={"shrink": 0.4, "relu_shrink": 1.0}),
    ("tiny_imagenet/eps1_255", "taps"): _TAPS_TIN(train_eps=1 / 255, l1=0.0, loss=_TAPS_SPLIT),
    # --train-steps 10: 10 constant steps of 0.2 of the box width (TAPS's select_schedule).
    ("tiny_imagenet/eps1_255", "staps"): _TAPS_TIN(
        train_eps=1 / 255, l1=1e-6 / 7,
        loss={"shrink": 0.6, **_STAPS_SPLIT, "taps.estimators.steps": 10,
              "taps.estimators.step_size": 0.4, "taps.estimators.schedule": ConstantStep}),
    ("tiny_imagenet/eps1_255", "cc_ibp"): _EXP_TIN(train_eps=1 / 255,
                                                   loss={"alpha": 0.01, **_FGSM}),
    ("tiny_imagenet/eps1_255", "mtl_ibp"): _EXP_TIN(train_eps=1 / 255,
                                                    loss={"alpha": 0.01, **_FGSM}),
    ("tiny_imagenet/eps1_255", "exp_ibp"): _EXP_TIN(train_eps=1 / 255,
                                                    loss={"alpha": 0.04, **_FGSM}),
    ("tiny_imagenet/eps1_255", "pgd"): _PGD_OTHER(train_eps=1 / 255, loss=_MADRY_CIFAR),
}

# CPU-scale MNIST (configs/mnist_cpu, issue "Results"): each paper recipe of configs/mnist on CNN3
# with one shortened schedule shared by every method of a setting. Only what the shortening
# changes is written here; the rest (train eps, loss options, clip, Shi terms, L1) is the paper
# entry's.
CPU_MNIST_SCHEDULE: Mapping[str, Any] = {"epochs": 30, "warmup": 1, "ramp": 10,
                                         "milestones": (25, 28)}
CPU_MNIST_MODEL = "cnn3"
CPU_MNIST_SETTINGS = {"mnist_cpu/eps0.1": 0.1, "mnist_cpu/eps0.3": 0.3}


def _cpu(setting: str, method: str, *, like: str | None = None, **changes: Any) -> Recipe:
    paper = f"mnist/{setting}"
    source = f"configs/{paper}/{like or method}.yaml on CNN3, shortened"
    return replace(PUBLISHED[(paper, like or method)], source=source,
                   **{**CPU_MNIST_SCHEDULE, **changes})


CPU_MNIST: Mapping[tuple[str, str], Recipe] = {
    **{(f"mnist_cpu/{s}", m): _cpu(s, m)
       for s in ("eps0.1", "eps0.3")
       for m in ("pgd", "ibp", "crown_ibp", "sabr", "taps", "cc_ibp", "mtl_ibp")},
    # TAPS's --L1-reg is divided by the number of conv/linear layers: 3 in CNN3 (7 in CNN7).
    ("mnist_cpu/eps0.1", "staps"): _cpu("eps0.1", "staps", l1=2e-5 / 3),
    ("mnist_cpu/eps0.3", "staps"): _cpu("eps0.3", "staps", l1=2e-6 / 3),
    # No MNIST Exp-IBP recipe: CC-IBP's of the setting (alpha, L1, train eps, attack).
    ("mnist_cpu/eps0.1", "exp_ibp"): _cpu("eps0.1", "exp_ibp", like="cc_ibp"),
    ("mnist_cpu/eps0.3", "exp_ibp"): _cpu("eps0.3", "exp_ibp", like="cc_ibp"),
}
