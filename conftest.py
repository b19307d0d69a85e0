"""Test-session settings for the whole repository.

Unit tests use small tensors, for which one thread is fastest and immune to other processes
on the machine oversubscribing the cores; set TIGHTROPE_TEST_THREADS to change it.
"""

from __future__ import annotations

import os

import torch

torch.set_num_threads(int(os.environ.get("TIGHTROPE_TEST_THREADS", "1")))
