"""Test-session settings for the whole repository.

Unit tests use small tensors, for which one thread is fastest and immune to other processes
on the machine oversubscribing the cores; set TIGHTROPE_TEST_THREADS to change it.

Bound computations run eagerly unless a test turns compiled kernels on; the command-line
tools turn them on for their process, so the setting is put back after every test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

torch.set_num_threads(int(os.environ.get("TIGHTROPE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _eager_bounds_after_each_test() -> Iterator[None]:
    yield
    try:
        from tightrope.bounds import compile_kernels
    except ImportError:  # a package tested without tightrope.bounds installed
        return
    compile_kernels(False)
