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



def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(platform.machine().lower() not in {"x86_64", "amd64"},
                    reason="FTZ/DAZ settings of x86 CPUs")
def test_flush_denormals_reaches_every_thread_when_called_first() -> None:
    # In fresh processes with two threads: called first, every worker thread flushes (a
    # product of denormals, made from their bits, spread over the threads is all zero) and
    # normal numbers are untouched; called
    # after a parallel operation started the workers, it says that they do not.
    code = (
        "import torch\n"
        "from tightrope.bounds import flush_denormals\n"
        "{before}"
        "applied = flush_denormals()\n"
        "torch.set_num_threads(2)\n"
        "x = torch.full((1 << 22,), 1 << 20, dtype=torch.int32).view(torch.float32)\n"
        "normal = torch.full((1 << 22,), 3e-38) * 0.5\n"
        "print(applied, int((x * 1.0).count_nonzero()), bool((normal == 1.5e-38).all()))\n"
    )
    assert _run(code.format(before="")).split() == ["True", "0", "True"]
    late = "torch.set_num_threads(2)\n(torch.ones(1 << 22) * 2.0).sum()\n"
    applied, kept, _ = _run(code.format(before=late)).split()
    assert applied == "False"
    assert int(kept) > 0, "the worker started before the call keeps denormals"
