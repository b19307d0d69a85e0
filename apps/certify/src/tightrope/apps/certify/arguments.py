"""Shared by the subcommands: argument types that check numbers when the command line is
parsed (a bad value ends the run at once: exit status 2 and a one-line error), and
:func:`one_line` for error messages."""

from __future__ import annotations

import argparse
import math

__all__ = ["one_line", "radius", "seconds"]


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def seconds(text: str) -> float:
    """A time budget: a finite number of seconds > 0."""
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"must be a finite number of seconds > 0 (e.g. 30), got {text!r}")
    return value


def radius(text: str) -> float:
    """An l_inf radius in pixel units: a finite number >= 0."""
    value = _number(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(
            f"must be a finite number >= 0 (pixel units, e.g. 0.1), got {text!r}")
    return value


def one_line(error: BaseException) -> str:
    """The error's message on one line (an indented list of problems joined with ``;``)."""
    lines = [line.strip().removeprefix("- ") for line in str(error).splitlines()]
    return "; ".join(line for line in lines if line).replace(":;", ":")
