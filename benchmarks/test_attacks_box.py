"""Time and memory per sample of the multi-estimator box PGD (TAPS) on a CNN7 classifier head.

The head is the end of CNN7 (Shi et al. 2021) on CIFAR-shaped inputs: the latent box lives on
the 128x16x16 = 32768 features after the conv stack (as IBP would give it), and the head is
``Linear(32768, 512) - BN1d - ReLU - Linear(512, K)`` in eval mode, with K = 10 (CIFAR-10) and
K = 200 (TinyImageNet's class count). Each sample runs K - 1 estimators, all in one batch.

Groups:

* ``multi-estimator-K10`` — the batched attack against a Python loop over the 9 classes (one
  plain signed-gradient PGD per class on the B samples): what batching buys.
* ``multi-estimator-K200`` — the batched attack alone (a loop over 199 classes is too slow to
  time here).

Times per sample and the peak resident-memory increase per sample (measured once per K in a
fresh subprocess running this file) are printed at the end; float32 on CPU, with the thread
count benchmarks/conftest.py sets (the memory subprocess uses one thread).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture
from torch import Tensor, nn

from tightrope.attacks import MultiEstimatorConfig, multi_estimator_box_pgd

LATENT = 128 * 16 * 16
STEPS = 10
ROUNDS = 5
BATCH = {10: 4, 200: 2}


def cnn7_head(num_classes: int) -> nn.Sequential:
    """The classifier head of CNN7 after its conv stack (Shi et al. 2021)."""
    return nn.Sequential(
        nn.Linear(LATENT, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, num_classes)
    ).eval()


def latent_box(batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Boxes around non-negative (post-ReLU) features with half-widths up to 0.1."""
    centre = torch.randn(batch, LATENT, generator=generator).clamp(min=0)
    half_width = 0.1 * torch.rand(batch, LATENT, generator=generator)
    return (centre - half_width).clamp(min=0), centre + half_width


def problem(num_classes: int) -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    torch.manual_seed(0)  # benchmark set-up only: the head's weights
    head = cnn7_head(num_classes)
    generator = torch.Generator().manual_seed(1)
    lower, upper = latent_box(BATCH[num_classes], generator)
    y = torch.randint(0, num_classes, (BATCH[num_classes],), generator=generator)
    return head, lower, upper, y


def loop_over_classes(
    head: nn.Module, lower: Tensor, upper: Tensor, y: Tensor, generator: torch.Generator
) -> Tensor:
    """The unbatched baseline: one signed-gradient PGD per non-target class, in a loop."""
    for parameter in head.parameters():
        parameter.requires_grad_(False)
    num_classes = head(lower[:1]).shape[1]
    all_classes = torch.arange(num_classes).expand(y.shape[0], num_classes)
    classes = all_classes[all_classes != y.unsqueeze(1)].view(y.shape[0], num_classes - 1)
    worst = []
    step = (2.5 / STEPS) * (upper - lower) / 2
    for position in range(num_classes - 1):
        target = classes[:, position : position + 1]
        z = lower + (upper - lower) * torch.rand(lower.shape, generator=generator)
        best = torch.full(y.shape, float("-inf"))
        for _ in range(STEPS):
            z_var = z.detach().requires_grad_(True)
            logits = head(z_var)
            violation = (logits.gather(1, target) - logits.gather(1, y.unsqueeze(1))).squeeze(1)
            (gradient,) = torch.autograd.grad(violation.sum(), z_var)
            best = torch.maximum(best, violation.detach())
            z = torch.minimum(torch.maximum(z + step * gradient.sign(), lower), upper)
        with torch.no_grad():
            logits = head(z)
        last = (logits.gather(1, target) - logits.gather(1, y.unsqueeze(1))).squeeze(1)
        worst.append(-torch.maximum(best, last))
    return torch.stack(worst, dim=1)


def batched(head: nn.Module, lower: Tensor, upper: Tensor, y: Tensor, seed: int = 0) -> Tensor:
    found = multi_estimator_box_pgd(
        head,
        lower,
        upper,
        y,
        config=MultiEstimatorConfig(steps=STEPS),
        generator=torch.Generator().manual_seed(seed),
    )
    return found.margins


def peak_memory_per_sample_mb(num_classes: int) -> float:
    """Peak resident-memory increase of one batched attack, per sample, in a fresh process."""
    # A fixed mmap threshold makes glibc return large freed blocks to the system at once, so
    # the resident size before the attack is not inflated by the warm-up's freed memory.
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    completed = subprocess.run(
        [sys.executable, __file__, "--memory", str(num_classes)],
        capture_output=True,
        text=True,
        check=True,
        env=environment,
    )
    return float(completed.stdout.strip().splitlines()[-1])


class Report:
    """Collects per-sample times and memory and prints them in the terminal summary."""

    def __init__(self) -> None:
        self.times: dict[tuple[int, str], float] = {}
        self.lines: dict[str, str] = {}

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.lines:
            terminalreporter.section("tightrope.attacks: multi-estimator box PGD (same run)")
            for line in self.lines.values():
                terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def report(request: pytest.FixtureRequest) -> Report:
    collected = Report()
    request.config.pluginmanager.register(collected, "tightrope-attacks-box-report")
    return collected


@pytest.mark.parametrize(
    ("num_classes", "member"),
    [(10, "batched"), (10, "loop-over-classes"), (200, "batched")],
)
def test_multi_estimator(
    benchmark: BenchmarkFixture, report: Report, num_classes: int, member: str
) -> None:
    head, lower, upper, y = problem(num_classes)
    batch = y.shape[0]
    benchmark.group = f"multi-estimator-K{num_classes}"
    benchmark.extra_info.update(
        batch=batch,
        steps=STEPS,
        estimators=batch * (num_classes - 1),
        baseline=member == "loop-over-classes" or num_classes == 200,
    )
    generator = torch.Generator().manual_seed(0)
    if member == "batched":
        benchmark.pedantic(
            batched, args=(head, lower, upper, y), rounds=ROUNDS, warmup_rounds=1, iterations=1
        )
    else:
        benchmark.pedantic(
            loop_over_classes,
            args=(head, lower, upper, y, generator),
            rounds=ROUNDS,
            warmup_rounds=1,
            iterations=1,
        )
    if benchmark.stats is None:
        return
    seconds = float(benchmark.stats.stats.min)
    report.times[(num_classes, member)] = seconds
    line = (
        f"K={num_classes} {member}: {seconds / batch * 1e3:.0f} ms per sample "
        f"(min of {ROUNDS}, batch {batch}, {STEPS} steps, {torch.get_num_threads()} threads)"
    )
    if member == "batched":
        memory = peak_memory_per_sample_mb(num_classes)
        points = (num_classes - 1) * LATENT * 4 / 2**20
        benchmark.extra_info.update(peak_memory_per_sample_mb=memory)
        line += f", peak memory +{memory:.0f} MiB per sample ({points:.1f} MiB of points)"
    report.lines[f"{num_classes}-{member}"] = line
    loop, fast = report.times.get((10, "loop-over-classes")), report.times.get((10, "batched"))
    if loop is not None and fast is not None:
        report.lines["ratio"] = f"K=10 loop-over-classes / batched = {loop / fast:.2f}"


def _measure_memory(num_classes: int) -> None:
    torch.set_num_threads(1)
    head, lower, upper, y = problem(num_classes)
    batched(head, lower[:1], upper[:1], y[:1])  # warm up kernels and the allocator
    with open("/proc/self/statm") as statm:
        resident_before = int(statm.read().split()[1]) * resource.getpagesize()
    batched(head, lower, upper, y)
    # The one-sample warm-up peaked lower, so the lifetime peak is now this attack's.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(max(peak - resident_before, 0) / 2**20 / y.shape[0])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory":
        _measure_memory(int(sys.argv[2]))
