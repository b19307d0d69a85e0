"""Process-level settings that make bound propagation faster on CPU.

Bound computations allocate and free many large temporaries (a CROWN pass holds ``B x K`` rows
of every layer). glibc's ``malloc`` serves blocks above its mmap threshold (128 KiB at start,
adjusted upwards as blocks are freed) with fresh ``mmap`` pages and gives them back on ``free``,
so every such temporary costs a round of page faults and zeroing in the kernel. On a 2-core
machine that was a third of the wall time of IBP and CROWN on CNN7 (``benchmarks/``).
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

#: ``mallopt`` parameters (``<malloc.h>``).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: The largest mmap threshold glibc accepts on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``).
_MMAP_THRESHOLD = 32 << 20
#: Freed memory at the top of the heap is returned to the system above this size only.
_TRIM_THRESHOLD = (1 << 31) - 1


def keep_freed_memory() -> bool:
    """Let glibc keep freed blocks of up to 32 MiB for reuse instead of unmapping them.

    Affects the whole process from the call on (every later ``malloc``, including PyTorch's CPU
    tensors): up to 2 GiB of freed heap may stay reserved rather than go back to the system.
    The command-line tools call it at start; library users may call it once in their own
    programs. Tensors above 32 MiB still get their own mapping.

    Returns:
        True when the settings were applied (Linux with glibc), False elsewhere (nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only (musl has no mallopt effect)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )
