"""Helpers of the tightrope.train tests: tiny configs on the synthetic data set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tightrope.train import TrainConfig, parse_config


def tiny_config(**overrides: Any) -> TrainConfig:
    """CNN3 on 12x12 synthetic images: 3 epochs of 6 steps (warm-up, ramp, full eps)."""
    data: dict[str, Any] = {
        "epochs": 3,
        "seed": 0,
        "precision": "float64",
        "data": {"dataset": "synthetic", "batch_size": 32, "validation_size": 32,
                 "synthetic_size": 224, "eval_batch_size": 64},
        "model": {"name": "cnn3", "options": {"width": 4}},
        "loss": {"method": "ibp"},
        "eps": {"train": 0.05, "warmup_epochs": 1, "ramp_epochs": 1},
        "evaluation": {"pgd_steps": 2},
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            data.setdefault(section, {})[name] = value
        else:
            data[section] = value
    return parse_config(data)


@pytest.fixture
def make_config() -> Callable[..., TrainConfig]:
    """:func:`tiny_config`, as a fixture (test modules cannot import this conftest)."""
    return tiny_config
