"""tightrope.train: certified training — data, models, typed configs, schedules, the trainer and
checkpoints.

* :func:`load_config` / :class:`TrainConfig` — a typed YAML config (frozen dataclasses; bad
  keys, types and ranges rejected with the key named);
* :func:`load_splits`, :func:`load_test_split`, :class:`TensorLoader` — MNIST, Fashion-MNIST,
  CIFAR-10, TinyImageNet and a synthetic set as device-resident tensors in ``[0, 1]``;
* :func:`build_model` / :data:`MODELS` — CNN3, CNN7 and an MLP, ``Normalize`` first
  (Shi et al. 2021);
* :class:`Schedule` — warm-up, the smoothed eps ramp, CROWN-IBP's beta/kappa and Shi et al.'s
  regulariser weight, per batch;
* :class:`Trainer` — ``train_one_epoch``, ``evaluate``, ``fit``, checkpoints and resumption;
* :func:`load_checkpoint` — rebuild a trained model (``torch.load(..., weights_only=True)``);
  a file that cannot serve raises :class:`CheckpointError` (a ``ValueError``) naming it.

Example::

    from tightrope.train import Trainer, create_run_dir, load_config

    config = load_config("configs/fashion_mnist/cpu_ibp.yaml")
    result = Trainer(config, run_dir=create_run_dir("runs", config)).fit()
"""

from tightrope.train.__about__ import __version__
from tightrope.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from tightrope.train.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EpsConfig,
    EpsShape,
    EvalConfig,
    LossSection,
    ModelConfig,
    OptimConfig,
    Precision,
    RegularizerSection,
    TrainConfig,
    apply_overrides,
    load_config,
    parse_config,
)
from tightrope.train.data import (
    DATASET_INFO,
    Augmentation,
    DatasetInfo,
    DatasetName,
    DatasetNotFoundError,
    ImageData,
    Splits,
    load_splits,
    load_test_split,
    synthetic,
)
from tightrope.train.evaluation import EvalSettings, evaluate
from tightrope.train.loader import Shard, TensorLoader, random_crop_flip
from tightrope.train.models import MODELS, build_model, cnn3, cnn7, mlp
from tightrope.train.rundir import create_run_dir, write_provenance, write_text_atomic
from tightrope.train.schedules import Phase, Schedule, smoothed_ramp
from tightrope.train.trainer import (
    Distributed,
    FitResult,
    NonFiniteLossError,
    Progress,
    Trainer,
)

__all__ = [
    "DATASET_INFO",
    "MODELS",
    "Augmentation",
    "Checkpoint",
    "CheckpointConfig",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "DatasetInfo",
    "DatasetName",
    "DatasetNotFoundError",
    "Distributed",
    "EpsConfig",
    "EpsShape",
    "EvalConfig",
    "EvalSettings",
    "FitResult",
    "ImageData",
    "LossSection",
    "ModelConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "Phase",
    "Precision",
    "Progress",
    "RegularizerSection",
    "Schedule",
    "Shard",
    "Splits",
    "TensorLoader",
    "TrainConfig",
    "Trainer",
    "__version__",
    "apply_overrides",
    "build_model",
    "cnn3",
    "cnn7",
    "create_run_dir",
    "evaluate",
    "load_checkpoint",
    "load_config",
    "load_splits",
    "load_test_split",
    "load_weights",
    "mlp",
    "parse_config",
    "random_crop_flip",
    "save_checkpoint",
    "smoothed_ramp",
    "synthetic",
    "write_provenance",
    "write_text_atomic",
]
