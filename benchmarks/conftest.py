"""Benchmark helpers: every group has one baseline (``extra_info["baseline"]``) and may have a
second reference (``extra_info["reference"]``); the summary prints ratios to both.

Ratios are taken between benchmarks of one run, so they compare like with like on a shared,
noisy machine; absolute times are printed for reference only.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import pytest
import torch

from tightrope.bounds import compile_kernels, flush_denormals, keep_freed_memory

sys.path.insert(0, str(Path(__file__).parent))
# As the command-line tools do: freed blocks are reused rather than unmapped and faulted back.
keep_freed_memory()
# As tightrope-train does (before any parallel operation): denormals are flushed to zero.
flush_denormals()
COMPILE = os.environ.get("TIGHTROPE_BENCH_COMPILE", "1") != "0"

THREADS = int(os.environ.get("TIGHTROPE_BENCH_THREADS", "2"))


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _compiled_kernels() -> None:
    # As tightrope-train does, but compiled at first use, so that compilation falls in the
    # warm-up rounds; TIGHTROPE_BENCH_COMPILE=0 measures eager kernels.
    compile_kernels(COMPILE, after_elements=0)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    session = getattr(terminalreporter.config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, list[tuple[str, float, bool, bool]]] = {}
    for bench in session.benchmarks:
        if not bench.stats or not bench.stats.data:
            continue
        median = statistics.median(bench.stats.data)
        baseline = bool(bench.extra_info.get("baseline", False))
        reference = bool(bench.extra_info.get("reference", False))
        groups.setdefault(bench.group or "", []).append((bench.name, median, baseline, reference))
    terminalreporter.section(f"ratios to each group's baseline (median times, {THREADS} threads)")
    for group, rows in sorted(groups.items()):
        base = next((row[1] for row in rows if row[2]), None)
        ref = next((row[1] for row in rows if row[3]), None)
        terminalreporter.write_line(f"[{group}]")
        for name, median, is_base, is_ref in sorted(rows, key=lambda row: row[1]):
            ratio = f"{median / base:8.2f}x" if base else "        "
            second = f"{median / ref:8.2f}x ref" if ref else ""
            mark = "  (baseline)" if is_base else "  (reference)" if is_ref else ""
            terminalreporter.write_line(
                f"  {name:<58}{median * 1e3:10.1f} ms {ratio}{second}{mark}"
            )
