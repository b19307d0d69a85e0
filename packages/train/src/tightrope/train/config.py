"""The typed training configuration: frozen dataclasses read from YAML.

A config file is a mapping with the sections below; every key is checked against its field's
type and range before any work starts, and an error names the key (``optim.lr: expected a
number, got str 'fast'``). Values that are fractions may be written as such (``eps.train:
2/255``). Defaults are the shared setup of Shi et al. 2021 (see each field).

Example (``configs/fashion_mnist/cpu_ibp.yaml``)::

    epochs: 6
    data: {dataset: fashion_mnist, batch_size: 128, validation_size: 5000}
    model: {name: cnn3}
    loss: {method: ibp}
    eps: {train: 0.1, test: 0.1, warmup_epochs: 1, ramp_epochs: 3}
    optim: {lr: 5.0e-4, milestones: [5], gamma: 0.2, grad_clip: 10.0}
    regularizers: {ibp_init: true, shi_lambda: 0.5}
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from tightrope.losses import METHODS, ModelSelection
from tightrope.train.data import DATASET_INFO, DatasetName, check_available
from tightrope.train.models import MODELS, build_model
from tightrope.train.structured import ConfigError, from_mapping, to_plain

# Methods whose loss makes no IBP pass, which Shi et al.'s regularisers read.
NO_IBP_PASS = ("standard", "pgd", "wong_kolter")
# Methods whose evaluation reports the TAPS accuracy.
TAPS_ACCURACY = ("taps", "staps")

__all__ = [
    "NO_IBP_PASS",
    "TAPS_ACCURACY",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EpsConfig",
    "EpsShape",
    "EvalConfig",
    "LoaderKind",
    "LossSection",
    "ModelConfig",
    "OptimConfig",
    "Precision",
    "RegularizerSection",
    "TrainConfig",
    "apply_overrides",
    "load_config",
]


class Precision(Enum):
    """Floating-point type of the model and the batches."""

    FLOAT32 = "float32"
    FLOAT64 = "float64"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self is Precision.FLOAT32 else torch.float64


class LoaderKind(Enum):
    """Which loader feeds training: ``tensor`` (the device-resident in-memory loader) or
    ``ffcv`` (``.beton`` files in ``data.cache_dir``; needs ``tightrope-train[ffcv]``)."""

    TENSOR = "tensor"
    FFCV = "ffcv"


class EpsShape(Enum):
    """How eps grows during the ramp: ``SMOOTHED`` (Shi et al. 2021: like t^4 for the first
    quarter of the ramp, then linearly) or ``LINEAR``."""

    SMOOTHED = "smoothed"
    LINEAR = "linear"


@dataclass(frozen=True, slots=True, kw_only=True)
class DataConfig:
    """Where the data come from and how they are batched.

    Attributes:
        dataset: ``mnist``, ``fashion_mnist``, ``cifar10``, ``tiny_imagenet`` or ``synthetic``.
        root: the data set's directory (MNIST/Fashion-MNIST are found automatically).
        validation_size: training images held out for model selection (never the test set).
        batch_size: training batch (per process under data parallelism; Shi et al.: 256 for
            MNIST, 128 otherwise).
        eval_batch_size: batch of the per-epoch evaluation.
        augment: apply the data set's augmentation (CIFAR-10/TinyImageNet: crop and flip).
        synthetic_size: training images of the synthetic set (tests).
        loader: ``tensor`` (default) or ``ffcv`` for the training split.
        cache_dir: where FFCV's ``.beton`` files are written (default
            ``~/.cache/tightrope/ffcv``).
        workers: FFCV's decoding threads.
    """

    dataset: DatasetName
    root: str | None = None
    validation_size: int = 5000
    batch_size: int = 128
    eval_batch_size: int = 500
    augment: bool = True
    synthetic_size: int = 512
    loader: LoaderKind = LoaderKind.TENSOR
    cache_dir: str | None = None
    workers: int = 4

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size", "synthetic_size", "workers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.validation_size < 0:
            raise ValueError(f"validation_size must be >= 0, got {self.validation_size}")
        images = DATASET_INFO[self.dataset].train_images
        if images is not None and self.validation_size >= images:
            raise ValueError(
                f"validation_size {self.validation_size} leaves no training images: "
                f"{self.dataset.value} has {images}; hold out fewer (the default is 5000)"
            )


# The model builders' arguments that the data set fixes (``Trainer.model_kwargs``).
_SET_BY_DATA = ("in_channels", "input_size", "num_classes", "mean", "std")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """The architecture: ``name`` in the model registry (``cnn3``, ``cnn7``, ``mlp``) and its
    ``options`` (e.g. ``{width: 32}``); the data set fixes input shape, classes and the
    normalisation."""

    name: str = "cnn7"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ValueError(f"unknown model {self.name!r}; known: {', '.join(sorted(MODELS))}")
        parameters = inspect.signature(MODELS[self.name]).parameters
        known = [name for name in parameters if name not in _SET_BY_DATA]
        for option in self.options:
            if option in _SET_BY_DATA:
                raise ValueError(f"options.{option}: set from the data set, not an option")
            if option not in parameters:
                raise ValueError(f"options.{option}: unknown option of {self.name}; its "
                                 f"options: {', '.join(known)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class LossSection:
    """The training loss and its schedules.

    Attributes:
        method: a name of ``tightrope.losses.METHODS`` (``ibp``, ``crown_ibp``, ``sabr``,
            ``taps``, ``staps``, ``cc_ibp``, ``mtl_ibp``, ``exp_ibp``, ``pgd``, ``standard``).
        options: fields of the method's config class (e.g. ``{alpha: 0.5}`` for CC-IBP;
            nested attack settings as mappings).
        beta: ``[start, end]`` of CROWN-IBP's ``beta``, which follows eps as
            ``start + (end - start) eps_t / eps_max`` (so 1 -> 0 is ``1 - eps_t / eps_max``, as
            Zhang et al. 2020's and Shi et al. 2021's code compute it); ``None``: the method's
            reference schedule (:attr:`TrainConfig.beta_schedule`: ``[1, 0]`` for
            ``crown_ibp``) unless ``options`` sets ``beta``, which is then kept fixed.
        kappa: ``[start, end]`` of the natural-loss weight ``kappa`` (IBP and CROWN-IBP),
            following eps the same way (Gowal et al. 2018: 1 -> 0.5); ``None``: the method's
            reference schedule for the data set (:attr:`TrainConfig.kappa_schedule`: ``[1, 0.5]``
            for ``crown_ibp`` on MNIST, none, i.e. ``kappa`` 0, elsewhere) unless ``options``
            sets ``kappa``.
        ibp_during_ramp: train with the method's ramp loss while eps grows: the one its paper
            uses there (the registry entry's ``ramp``: plain IBP for TAPS, IBP on SABR's small
            box, i.e. SABR, for STAPS, as Mao et al. 2023's code), plain IBP for methods
            without one; ``None`` means yes exactly for methods whose registry entry has one.
    """

    method: str = "ibp"
    options: Mapping[str, Any] = field(default_factory=dict)
    beta: tuple[float, float] | None = None
    kappa: tuple[float, float] | None = None
    ibp_during_ramp: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"method: unknown method {self.method!r}; known: {', '.join(sorted(METHODS))}"
            )
        for name in ("beta", "kappa"):
            pair = getattr(self, name)
            if pair is not None and not all(0.0 <= v <= 1.0 for v in pair):
                raise ValueError(f"{name}: both values must lie in [0, 1], got {list(pair)}")
        self.loss_config()  # rejects bad options now, with the key named

    def loss_config(self) -> Any:
        """The method's frozen config class built from ``options``."""
        method = METHODS[self.method]
        return from_mapping(method.config_type, self.options, "loss.options")

    @property
    def uses_ibp_during_ramp(self) -> bool:
        if self.ibp_during_ramp is not None:
            return self.ibp_during_ramp
        return METHODS[self.method].ramp is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class EpsConfig:
    """The perturbation radius (pixel units, inputs in ``[0, 1]``) and its schedule.

    Attributes:
        train: eps trained at after the ramp (MNIST often trains larger than it tests).
        test: eps of the per-epoch evaluation and of the checkpoint's certification default;
            ``None`` means ``train``.
        warmup_epochs: epochs of natural training (eps = 0, plain cross-entropy) first.
        ramp_epochs: epochs over which eps grows from ``start`` to ``train``, per batch.
        start: eps at the beginning of the ramp.
        shape: ``smoothed`` (Shi et al. 2021) or ``linear``.
        smoothed_mid: fraction of the ramp with polynomial growth (0.25).
        smoothed_power: the exponent of that growth (4).
    """

    train: float
    test: float | None = None
    warmup_epochs: int = 0
    ramp_epochs: int = 0
    start: float = 0.0
    shape: EpsShape = EpsShape.SMOOTHED
    smoothed_mid: float = 0.25
    smoothed_power: float = 4.0

    def __post_init__(self) -> None:
        for name in ("train", "test", "start"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"eps.{name} must lie in [0, 1] (pixel units), got {value}")
        if self.start > self.train:
            raise ValueError(f"eps.start ({self.start}) must not exceed eps.train ({self.train})")
        if self.warmup_epochs < 0 or self.ramp_epochs < 0:
            raise ValueError("eps.warmup_epochs and eps.ramp_epochs must be >= 0")
        if not 0.0 < self.smoothed_mid < 1.0 or not 1.0 <= self.smoothed_power < math.inf:
            raise ValueError("eps.smoothed_mid must lie in (0, 1) and eps.smoothed_power be >= 1")

    @property
    def test_eps(self) -> float:
        return self.train if self.test is None else self.test


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimConfig:
    """Adam with a multi-step learning-rate decay (Shi et al. 2021).

    Attributes:
        lr: initial learning rate (5e-4).
        milestones: epochs (counted from 0) after which the rate is multiplied by ``gamma``.
        gamma: the decay factor (0.2).
        grad_clip: maximal global gradient norm; ``0`` disables clipping (10).
        weight_decay: Adam's L2 weight decay (0).
    """

    lr: float = 5e-4
    milestones: tuple[int, ...] = ()
    gamma: float = 0.2
    grad_clip: float = 10.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must lie in (0, 1], got {self.gamma}")
        # Written so that NaN fails too: a NaN grad_clip would silently disable clipping.
        if not 0 <= self.grad_clip < math.inf:
            raise ValueError(f"grad_clip must be a finite number >= 0 (0 disables clipping), "
                             f"got {self.grad_clip}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing, got {list(self.milestones)}")

    def lr_at(self, epoch: int) -> float:
        """The learning rate of epoch ``epoch`` (0-based)."""
        return self.lr * self.gamma ** sum(1 for m in self.milestones if epoch >= m)


@dataclass(frozen=True, slots=True, kw_only=True)
class RegularizerSection:
    """Regularisation and initialisation (Shi et al. 2021).

    Attributes:
        ibp_init: Shi et al.'s IBP initialisation of the weights before training.
        shi_lambda: weight ``lambda`` of the tightness and ReLU-balance regularisers during the
            ramp, applied as ``lambda (1 - eps_t / eps_max)`` (0.5; TinyImageNet 0.1-0.2).
        tau: the tightness regulariser's threshold (0.5).
        l1: weight of the L1 norm of the weights (0-5e-5).
        warmup_eps: during the natural warm-up the two Shi terms apply too, at full weight
            ``lambda``, read off the IBP bounds of a box of this radius (pixel units) while the
            loss stays the natural cross-entropy (Shi et al.'s code: ``--min-eps-reg 1e-6``,
            the default); 0 leaves the warm-up unregularised.
    """

    ibp_init: bool = False
    shi_lambda: float = 0.0
    tau: float = 0.5
    l1: float = 0.0
    warmup_eps: float = 1e-6

    def __post_init__(self) -> None:
        if not (0 <= self.shi_lambda < math.inf and 0 <= self.l1 < math.inf
                and 0 < self.tau < math.inf):
            raise ValueError("shi_lambda and l1 must be >= 0 and tau > 0")
        if not 0 <= self.warmup_eps <= 1:
            raise ValueError(f"warmup_eps must lie in [0, 1] (pixel units; 0 = no regularisers "
                             f"in the warm-up), got {self.warmup_eps}")


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalConfig:
    """The per-epoch evaluation on the validation split.

    Attributes:
        pgd_steps, pgd_restarts: the PGD attack of the adversarial accuracy.
        crown_ibp: also report CROWN-IBP-verified accuracy (about 15x a forward pass).
        max_samples: evaluate on at most this many validation samples (``None``: all).
        every_epochs: evaluate every this many epochs (and always after the last).
        selection: which epoch the run keeps as ``best.pt`` once eps is full: ``last``,
            ``best_verified`` (IBP/CROWN-IBP-verified, then clean accuracy) or ``best_taps``
            (TAPS/STAPS only); ``None``: the method's paper's rule
            (``tightrope.losses.METHODS[method].selection``: ``best_verified`` for IBP,
            CROWN-IBP and Lee, ``best_taps`` for TAPS/STAPS, ``last`` otherwise).
    """

    pgd_steps: int = 10
    pgd_restarts: int = 1
    crown_ibp: bool = True
    max_samples: int | None = None
    every_epochs: int = 1
    selection: ModelSelection | None = None

    def __post_init__(self) -> None:
        if self.pgd_steps < 0 or self.pgd_restarts < 1 or self.every_epochs < 1:
            raise ValueError("pgd_steps >= 0, pgd_restarts >= 1 and every_epochs >= 1 needed")
        if self.max_samples is not None and self.max_samples <= 0:
            raise ValueError(f"max_samples must be positive, got {self.max_samples}")


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointConfig:
    """How often ``last.pt`` is written: every ``every_steps`` optimiser steps (0: only at the
    end of each epoch, which always happens)."""

    every_steps: int = 0

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"every_steps must be >= 0, got {self.every_steps}")


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """A whole training run. See the module docstring for the YAML form.

    Attributes:
        epochs: total epochs (warm-up and ramp included).
        seed: the key of every random draw (initialisation, shuffling, augmentation, attacks).
        precision: ``float32`` or ``float64``.
        data, model, loss, eps, optim, regularizers, evaluation, checkpoint: the sections.
    """

    data: DataConfig
    eps: EpsConfig
    epochs: int
    seed: int = 0
    precision: Precision = Precision.FLOAT32
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    regularizers: RegularizerSection = field(default_factory=RegularizerSection)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.loss.method in NO_IBP_PASS and self.regularizers.shi_lambda > 0:
            raise ValueError(
                f"regularizers.shi_lambda: the tightness and ReLU-balance terms read the IBP "
                f"bounds of the loss, and {self.loss.method!r} computes none: set it to 0"
            )
        if self.eps.warmup_epochs + self.eps.ramp_epochs > self.epochs:
            raise ValueError(
                f"eps.warmup_epochs + eps.ramp_epochs = "
                f"{self.eps.warmup_epochs + self.eps.ramp_epochs} exceeds epochs = {self.epochs}"
            )
        if (self.selection is ModelSelection.BEST_TAPS
                and self.loss.method not in TAPS_ACCURACY):
            raise ValueError(
                f"evaluation.selection: best_taps needs the TAPS accuracy, which is evaluated "
                f"for {' and '.join(TAPS_ACCURACY)} only, not {self.loss.method!r}; use "
                "best_verified or last"
            )
        self._check_model()

    @property
    def selection(self) -> ModelSelection:
        """The model-selection rule of the run: ``evaluation.selection``, or the method's."""
        chosen = self.evaluation.selection
        return chosen if chosen is not None else METHODS[self.loss.method].selection

    @property
    def beta_schedule(self) -> tuple[float, float] | None:
        """CROWN-IBP's ``beta`` ``[start, end]`` over eps (``None``: ``options`` decides).

        ``loss.beta`` when given; else, unless ``options`` sets ``beta``, the reference's
        1 -> 0 for ``crown_ibp`` (Zhang et al. 2020's ``final-beta`` 0; Shi et al. 2021's
        ``1 - eps_t / eps_max``).
        """
        if self.loss.beta is not None or "beta" in self.loss.options:
            return self.loss.beta
        return (1.0, 0.0) if self.loss.method == "crown_ibp" else None

    @property
    def kappa_schedule(self) -> tuple[float, float] | None:
        """The natural-loss weight ``kappa`` ``[start, end]`` over eps (``None``: ``options``).

        ``loss.kappa`` when given; else, unless ``options`` sets ``kappa``, CROWN-IBP's
        reference per data set (huanzhang12/CROWN-IBP): 1 -> 0.5 on MNIST
        (``config/mnist_dm-large_*.json``: ``robust_natural`` with the default ``final-kappa``
        0.5), no natural term (``kappa`` 0) on every other data set (CIFAR-10:
        ``cifar_dm-large_*.json`` train ``robust``; Shi et al. 2021's CIFAR-10/TinyImageNet
        CROWN-IBP has no natural term; Fashion-MNIST: ``fashion-mnist_crown.json``, ``robust``).
        """
        if self.loss.kappa is not None or "kappa" in self.loss.options:
            return self.loss.kappa
        if self.loss.method == "crown_ibp" and self.data.dataset is DatasetName.MNIST:
            return (1.0, 0.5)
        return None

    def _check_model(self) -> None:
        # Build the model once for the data set's shape (a few milliseconds on the CPU, under a
        # forked RNG), so that option values it cannot take are config errors now and not
        # failures after the run directory exists.
        info = DATASET_INFO[self.data.dataset]
        try:
            with torch.random.fork_rng(devices=[]):
                build_model(self.model.name, in_channels=info.shape[0], input_size=info.shape[1],
                            num_classes=info.num_classes, mean=info.mean, std=info.std,
                            **self.model.options)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"model.options {dict(self.model.options)}: {error}") from error

    def to_plain(self) -> dict[str, Any]:
        """The config as plain YAML-able values (round-trips through :func:`parse_config`)."""
        plain: dict[str, Any] = to_plain(self)
        return plain


def parse_config(data: Any, *, check_data: bool = True) -> TrainConfig:
    """A :class:`TrainConfig` from parsed YAML.

    Raises:
        ConfigError: unknown key, wrong type, value out of range (eps outside [0, 1], ...),
            with the key named.
        tightrope.train.data.DatasetNotFoundError: the data set's files are missing (when
            ``check_data``), saying how to obtain them.
    """
    if isinstance(data, Mapping):
        for required in ("data", "eps", "epochs"):
            if required not in data:
                raise ConfigError(f"{required}: missing (required)")
        if isinstance(data.get("data"), Mapping) and "dataset" not in data["data"]:
            raise ConfigError("data.dataset: missing (one of "
                              f"{', '.join(d.value for d in DatasetName)})")
        if isinstance(data.get("eps"), Mapping) and "train" not in data["eps"]:
            raise ConfigError("eps.train: missing (the training eps in pixel units)")
    config = from_mapping(TrainConfig, data)
    if check_data:
        check_available(config.data.dataset, config.data.root)
    return config


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                *, check_data: bool = True) -> TrainConfig:
    """Read a YAML config, apply ``key.sub=value`` overrides and validate everything.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: see :func:`parse_config`; the message names the file and key. Also a
            path that is a directory or unreadable, and a file that is not a YAML mapping.
    """
    import yaml

    try:
        text = Path(path).read_text()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path}: no such config file") from error
    except IsADirectoryError as error:
        raise ConfigError(f"{path} is a directory: pass a YAML config file (such as "
                          "configs/fashion_mnist/cpu_ibp.yaml)") from error
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not a text file"
        raise ConfigError(f"{path}: cannot read the config ({reason})") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of sections (epochs, data, eps, ...), "
                          f"got a YAML {type(data).__name__}")
    data = apply_overrides(data, overrides)
    try:
        return parse_config(data, check_data=check_data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


def apply_overrides(data: Mapping[str, Any], overrides: list[str] | tuple[str, ...]
                    ) -> dict[str, Any]:
    """A copy of ``data`` with each ``"a.b.c=value"`` set (``value`` parsed as YAML).

    Raises:
        ConfigError: an override without ``=``.
    """
    import yaml

    result: dict[str, Any] = _deep_copy(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected key.sub=value")
        parts = key.strip().split(".")
        target = result
        for part in parts[:-1]:
            nested = target.get(part)
            if not isinstance(nested, dict):
                nested = {}
                target[part] = nested
            target = nested
        target[parts[-1]] = yaml.safe_load(raw)
    return result


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {key: _deep_copy(value) if isinstance(value, Mapping) else value
            for key, value in data.items()}


def replace(config: TrainConfig, **changes: Any) -> TrainConfig:
    """``dataclasses.replace`` for the top level (convenience for tests and tools)."""
    return dataclasses.replace(config, **changes)
