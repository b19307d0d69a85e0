"""The VNN-COMP result file of ``tightrope-certify vnnlib --out``: cleared when a run starts,
so a run that fails or is killed never leaves an earlier answer behind, and written in one
step, so a reader never sees half an answer."""

from __future__ import annotations

import contextlib
import os
import stat

__all__ = ["clear_answer", "write_answer"]


def _regular_or_absent(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return True


def clear_answer(path: str) -> None:
    """Remove the result file ``path`` (truncate it instead when it is not a regular file, e.g.
    a link or ``/dev/stdout``).

    Raises:
        OSError: it cannot be removed, or its folder does not exist.
    """
    if _regular_or_absent(path):
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            raise FileNotFoundError(2, "no such folder", directory)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    else:
        with open(path, "w", encoding="utf-8"):
            pass


def write_answer(path: str, text: str) -> None:
    """Write ``text`` to ``path``: to a temporary file renamed over it when ``path`` is a
    regular file or absent (a kill mid-write leaves no partial answer), else directly."""
    if not _regular_or_absent(path):
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
