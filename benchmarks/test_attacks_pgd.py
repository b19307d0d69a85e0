"""Cost of tightrope.attacks' PGD relative to plain forward+backward passes.

Groups (each compares members measured in the same run; ratios are printed at the end):

* ``pgd-cost-cnn7`` / ``pgd-cost-cnn3`` — PGD with k steps (no early stop) against k forward+
  backward passes for the input gradient with frozen parameters (the lower bound on any
  k-step attack), and against the same passes with parameter gradients accumulated (what a
  loop without frozen parameters pays). Target: PGD / passes ~ 1.0-1.1 (PGD adds one forward
  pass for the last iterate and elementwise bookkeeping).
* ``pgd-restarts`` — on an easily broken model (most samples fall in the first run), 5 restarts
  that re-attack only the still-robust samples against 5 full runs on the whole batch.

Models are benchmarks/_models.py's (Shi et al. 2021): CNN7 on CIFAR-shaped 3x32x32 inputs, CNN3 on
MNIST-shaped 1x28x28 inputs, randomly initialised, BatchNorm in eval mode; float32 on CPU, with
the thread count benchmarks/conftest.py sets. Each group marks its baseline in ``extra_info``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from _models import cnn3, cnn7
from pytest_benchmark.fixture import BenchmarkFixture
from torch import Tensor, nn

from tightrope.attacks import PGDConfig, pgd

STEPS = 10
ROUNDS = 7


CASES = {"cnn7": (cnn7, (16, 3, 32, 32)), "cnn3": (cnn3, (64, 1, 28, 28))}


class RatioReport:
    """Collects the times of each (group, member) and prints ratios in the terminal summary.

    Ratios use the minimum over rounds (the least disturbed by other processes on a shared
    machine); the medians are shown beside them.
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self.times: dict[tuple[str, str], tuple[float, float]] = {}
        self.lines: dict[tuple[str, str, str], str] = {}

    def record(self, group: str, member: str, benchmark: BenchmarkFixture) -> None:
        stats = benchmark.stats  # None when benchmarking is disabled
        if stats is not None:
            self.times[(group, member)] = (float(stats.stats.min), float(stats.stats.median))

    def ratio(self, group: str, numerator: str, denominator: str, note: str = "") -> None:
        top, bottom = self.times.get((group, numerator)), self.times.get((group, denominator))
        if top is not None and bottom is not None:
            self.lines[(group, numerator, denominator)] = (
                f"{group}: {numerator} / {denominator} = {top[0] / bottom[0]:.3f} "
                f"(min {top[0] * 1e3:.0f} / {bottom[0] * 1e3:.0f} ms; "
                f"median ratio {top[1] / bottom[1]:.3f}; "
                f"{torch.get_num_threads()} threads){note}"
            )

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.lines:
            terminalreporter.section(self.title)
            for line in self.lines.values():
                terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def report(request: pytest.FixtureRequest) -> RatioReport:
    collected = RatioReport("tightrope.attacks: PGD cost ratios (same run)")
    request.config.pluginmanager.register(collected, "tightrope-attacks-pgd-ratios")
    return collected


def _frozen(model: nn.Module) -> nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _input_gradient_passes(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> None:
    """``steps`` forward+backward passes for the input gradient (parameters frozen)."""
    for _ in range(steps):
        x_var = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x_var), y, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, x_var)
        x = (x + 0.01 * gradient.sign()).clamp(0, 1)


def _passes_with_parameter_gradients(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> None:
    for _ in range(steps):
        x_var = x.detach().requires_grad_(True)
        F.cross_entropy(model(x_var), y, reduction="sum").backward()
        assert x_var.grad is not None
        x = (x + 0.01 * x_var.grad.sign()).clamp(0, 1)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("member", ["passes", "pgd", "passes-with-parameter-grads"])
@pytest.mark.parametrize("case", ["cnn7", "cnn3"])
def test_pgd_cost(benchmark: BenchmarkFixture, report: RatioReport, case: str, member: str) -> None:
    make, shape = CASES[case]
    torch.manual_seed(0)  # benchmark set-up only: random weights and inputs
    model = make().eval()
    x, y = torch.rand(shape), torch.randint(0, 10, (shape[0],))
    group = f"pgd-cost-{case}"
    benchmark.group = group
    generator = torch.Generator().manual_seed(0)
    config = PGDConfig(steps=STEPS, early_stop=False)
    runs: dict[str, Callable[[], object]] = {
        "passes": lambda: _input_gradient_passes(_frozen(model), x, y, STEPS),
        "pgd": lambda: pgd(model, x, y, 8 / 255, config=config, generator=generator),
        "passes-with-parameter-grads": lambda: _passes_with_parameter_gradients(model, x, y, STEPS),
    }
    benchmark.extra_info.update(batch=shape[0], steps=STEPS, baseline=member == "passes")
    benchmark.pedantic(runs[member], rounds=ROUNDS, warmup_rounds=1, iterations=1)
    report.record(group, member, benchmark)
    report.ratio(group, "pgd", "passes", f"  [batch {shape[0]}, k={STEPS}]")
    report.ratio(group, "pgd", "passes-with-parameter-grads")


RESTART_EPS = 0.02  # on the untrained CNN3 below, ~80% of samples fall in the first run


@pytest.mark.parametrize("member", ["5-full-runs", "5-restarts-robust-only", "with-early-stop"])
def test_pgd_restarts(benchmark: BenchmarkFixture, report: RatioReport, member: str) -> None:
    torch.manual_seed(0)  # benchmark set-up only
    model = cnn3().eval()
    x = torch.rand(64, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(dim=1)  # every sample is correct before the attack
    group = "pgd-restarts"
    benchmark.group = group
    generator = torch.Generator().manual_seed(0)
    once = PGDConfig(steps=STEPS, early_stop=False)
    restarts = PGDConfig(steps=STEPS, restarts=5, early_stop=(member == "with-early-stop"))

    def five_full_runs() -> Tensor:
        broken = torch.zeros(x.shape[0], dtype=torch.bool)
        for _ in range(5):
            broken |= pgd(model, x, y, RESTART_EPS, config=once, generator=generator).success
        return broken

    def restarted() -> Tensor:
        return pgd(model, x, y, RESTART_EPS, config=restarts, generator=generator).success

    run = five_full_runs if member == "5-full-runs" else restarted
    broken = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    first = pgd(model, x, y, RESTART_EPS, config=once, generator=torch.Generator().manual_seed(0))
    robust_after_first = float((~first.success).float().mean())
    benchmark.extra_info.update(
        robust_after_first_run=robust_after_first,
        broken=int(broken.sum()),
        batch=x.shape[0],
        baseline=member == "5-full-runs",
    )
    report.record(group, member, benchmark)
    note = f"  [robust after run 1: {robust_after_first:.0%}]"
    report.ratio(group, "5-restarts-robust-only", "5-full-runs", note)
    report.ratio(group, "with-early-stop", "5-full-runs")
