"""Process-level settings that make bound propagation faster on CPU.

Bound computations allocate and free many large temporaries (a CROWN pass holds ``B x K`` rows
of every layer). glibc's ``malloc`` serves blocks above its mmap threshold (128 KiB at start,
adjusted upwards as blocks are freed) with fresh ``mmap`` pages and gives them back on ``free``,
so every such temporary costs a round of page faults and zeroing in the kernel. On a 2-core
machine that was a third of the wall time of IBP and CROWN on CNN7 (``benchmarks/``).
Arithmetic on denormal floats, which training's backward passes produce from confident
samples, is slower still: :func:`flush_denormals` treats them as zero.
"""

from __future__ import annotations

import ctypes
import sys

import torch

__all__ = ["flush_denormals", "keep_freed_memory"]

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


#: The bits of a denormal float32 (1.5e-39), below the smallest normal one (1.18e-38). Made
#: from bits, since a Python float converted under flushing is zero already.
_DENORMAL_BITS = 1 << 20
#: Elements of the check in :func:`flush_denormals`: enough for PyTorch to split the product
#: between all its CPU threads (its grain is 32768 elements per thread).
_CHECK_ELEMENTS = 1 << 22


def flush_denormals() -> bool:
    """Treat denormal (subnormal) floats as zero on CPU, in inputs and results (FTZ and DAZ).

    Arithmetic on denormals is tens to hundreds of times slower on x86 CPUs. They arise in
    certified training when a sample's bound is confident: the cross-entropy's gradient
    ``exp(-margin)`` falls below 1.2e-38 in float32 and every product of the backward pass
    with it is denormal too. On CNN7 (batch 128, 2-core CPU) that made some CROWN-IBP training
    steps 1.7-2.9 times slower than the others. Flushing changes results by less than
    1.2e-38 (float32) or 2.2e-308 (float64) in absolute value.

    ``tightrope-train`` calls it at start; ``tightrope-certify`` does not (verification keeps
    IEEE arithmetic). Call it at the start of a program, before PyTorch's first parallel
    operation: each CPU thread has its own setting, and PyTorch's worker threads take that of
    the thread that starts them.

    Returns:
        True when every CPU thread of PyTorch now flushes (checked with a product of denormals
        spread over all threads); False when the CPU cannot, or when worker threads started
        before the call keep denormals (nothing else changes then but the calling thread).
    """
    if not torch.set_flush_denormal(True):
        return False
    with torch.no_grad():
        bits = torch.full((_CHECK_ELEMENTS,), _DENORMAL_BITS, dtype=torch.int32)
        return not bool(torch.mul(bits.view(torch.float32), 1.0).count_nonzero())
