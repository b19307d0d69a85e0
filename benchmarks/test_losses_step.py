"""Cost of one certified-training step per method of tightrope.losses.

Group ``loss-step-cnn7`` (printed at the end with ratios): one full training step — loss,
backward, Adam step — of CNN7 (Shi et al. 2021, CIFAR shape 3x32x32, BatchNorm in train mode,
IBP initialisation) on a batch of 128 (``TIGHTROPE_BENCH_LOSS_BATCH``), eps 2/255, each method
with its paper defaults. Baseline: the standard step; reference: the IBP step. Targets (issue):
CC-/MTL-/Exp-IBP <= 2.0x IBP, SABR (8 PGD steps) <= 2.5x IBP, CROWN-IBP <= 3.0x IBP, IBP <= 3x
standard. ``wong_kolter`` (a backward pass per layer through the conv stack) is left out: it is
meant for small networks and takes minutes per CNN7 step.
"""

from __future__ import annotations

import os

import pytest
from _steps import loss_step
from pytest_benchmark.fixture import BenchmarkFixture

from tightrope.losses import METHODS

BATCH = int(os.environ.get("TIGHTROPE_BENCH_LOSS_BATCH", "128"))
ROUNDS = int(os.environ.get("TIGHTROPE_BENCH_LOSS_ROUNDS", "3"))
NAMES = [name for name in sorted(METHODS) if name != "wong_kolter"]


@pytest.mark.parametrize("name", NAMES)
def test_loss_step(benchmark: BenchmarkFixture, name: str) -> None:
    step = loss_step(name, BATCH)
    benchmark.group = "loss-step-cnn7"
    benchmark.extra_info["baseline"] = name == "standard"
    benchmark.extra_info["reference"] = name == "ibp"
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
