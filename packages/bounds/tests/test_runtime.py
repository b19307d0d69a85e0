"""keep_freed_memory: the glibc allocator settings."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings, Linux only")
def test_keep_freed_memory_applies_and_bounds_still_run() -> None:
    # In a fresh process, so the settings do not leak into this test session.
    code = (
        "import torch\n"
        "from tightrope.bounds import Box, ibp, keep_freed_memory\n"
        "applied = keep_freed_memory()\n"
        "model = torch.nn.Sequential(torch.nn.Linear(4, 3))\n"
        "box = Box.from_linf(torch.rand(2, 4), 0.1)\n"
        "bounds = ibp(model, box)\n"
        "assert bool((bounds.lower <= bounds.upper).all())\n"
        "print(applied, keep_freed_memory())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    glibc = platform.libc_ver()[0] == "glibc"
    assert out.stdout.split() == [str(glibc), str(glibc)]

