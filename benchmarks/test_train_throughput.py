"""Training throughput per method on CNN7 (CIFAR shape): one full training step (loss, backward,
Adam) of every registered loss against a standard cross-entropy step on the same batch.

Group ``train-step-cnn7-b16`` (baseline: ``standard``): CNN7 of Shi et al. 2021 in train mode
(BatchNorm batch statistics), batch 16 of 3x32x32 inputs, eps 2/255, each method's default
config, float32 on CPU. Images/s = 16 / time; the ratio is the cost of one step of the method
in standard steps. Group ``train-step-cnn3-b64``: standard, IBP and Wong & Kolter on CNN3
(1x28x28, batch 64, eps 0.1).
"""

from __future__ import annotations

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from tightrope.losses import METHODS
from tightrope.train import build_model

BATCH = 16
# Wong & Kolter's dual bound needs bounds on every layer's pre-activations by backward passes
# (full-CROWN cost): minutes per CNN7 step on a CPU; it is measured on CNN3 in its own group.
CNN7_METHODS = sorted(name for name in METHODS if name != "wong_kolter")


@pytest.mark.parametrize("method", CNN7_METHODS)
@pytest.mark.benchmark(group="train-step-cnn7-b16")
def test_training_step(benchmark: BenchmarkFixture, method: str) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("cnn7", in_channels=3, input_size=32, num_classes=10,
                            mean=[0.5] * 3, std=[0.25] * 3)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((BATCH, 3, 32, 32), generator=generator)
    y = torch.randint(0, 10, (BATCH,), generator=generator)
    loss = METHODS[method].default(torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()

    def step() -> float:
        out = loss(model, x, y, 2 / 255)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(out.loss)
        optimizer.step()
        return float(out.loss.detach())

    benchmark.extra_info["baseline"] = method == "standard"
    value = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert value == value  # finite or not, the step ran


@pytest.mark.parametrize("method", ["standard", "ibp", "wong_kolter"])
@pytest.mark.benchmark(group="train-step-cnn3-b64")
def test_training_step_cnn3(benchmark: BenchmarkFixture, method: str) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("cnn3", in_channels=1, input_size=28, num_classes=10,
                            mean=[0.5], std=[0.25])
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((64, 1, 28, 28), generator=generator)
    y = torch.randint(0, 10, (64,), generator=generator)
    loss = METHODS[method].default(torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        out = loss(model, x, y, 0.1)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(out.loss)
        optimizer.step()

    benchmark.extra_info["baseline"] = method == "standard"
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
