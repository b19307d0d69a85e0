"""Speed of tightrope.bounds relative to one plain forward pass, on CNN3 and CNN7.

Run with ``make bench`` (or ``pytest benchmarks/test_bounds_speed.py --benchmark-only``).
Models are random and in eval mode; specifications are the 9 margin rows of 10 classes;
eps = 0.01. Targets (issue 2): IBP <= 2.3x a forward pass; CROWN-IBP and CROWN at most half of
auto_LiRPA's times measured on this machine kind (IBP 3.5x / 9.4x, CROWN-IBP 37x / 118x on
CNN7 b32 / CNN3 b256; full CROWN on CNN3 b256 26 s).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _models import random_eval_model

from tightrope.bounds import Box, Intermediate, alpha_crown, crown, crown_ibp, ibp, margin_spec

EPS = 0.01
CASES = [("cnn7", 32), ("cnn7", 128), ("cnn3", 256)]


def _problem(name: str, batch: int) -> tuple[torch.nn.Module, torch.Tensor, Box, torch.Tensor]:
    model, shape = random_eval_model(name)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(batch, *shape, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    return model, x, Box.from_linf(x, EPS), margin_spec(y, 10)


def _run(benchmark, group: str, fn: Callable[[], object], rounds: int,  # type: ignore[no-untyped-def]
         baseline: bool = False) -> None:
    benchmark.group = group
    benchmark.extra_info["baseline"] = baseline
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)


#: Rounds per case (median of these). A round of CNN3 takes milliseconds and the machine's
#: state drifts over seconds, so it gets many.
ROUNDS = {"cnn7": 30, "cnn3": 200}


def _bounds(method: str, model: torch.nn.Module, x: torch.Tensor, box: Box,
            spec: torch.Tensor) -> Callable[[], object]:
    if method == "forward":
        return lambda: model(x)
    if method == "ibp":
        return lambda: ibp(model, box, spec)
    if method == "crown_ibp":
        return lambda: crown_ibp(model, box, spec)
    return lambda: crown_ibp(model, box, spec, upper=False)


# Methods vary fastest, so the runs of one case (and its forward baseline) follow each other.
@pytest.mark.parametrize("method", ["forward", "ibp", "crown_ibp", "crown_ibp_lower_only"])
@pytest.mark.parametrize(("model_name", "batch"), CASES)
def test_bounds(benchmark, model_name: str, batch: int, method: str) -> None:  # type: ignore[no-untyped-def]
    model, x, box, spec = _problem(model_name, batch)
    rounds = ROUNDS[model_name] // (1 if method in ("forward", "ibp") else 6)
    _run(benchmark, f"{model_name}-b{batch}", _bounds(method, model, x, box, spec),
         rounds=rounds, baseline=method == "forward")


@pytest.mark.parametrize(("model_name", "batch"), [("cnn3", 256)])
def test_crown(benchmark, model_name: str, batch: int) -> None:  # type: ignore[no-untyped-def]
    model, _, box, spec = _problem(model_name, batch)
    _run(benchmark, f"{model_name}-b{batch}", lambda: crown(model, box, spec), rounds=2)


@pytest.mark.parametrize(("model_name", "batch", "intermediate"),
                         [("cnn3", 256, "crown"), ("cnn7", 32, "ibp")])
def test_alpha_crown(benchmark, model_name: str, batch: int, intermediate: str) -> None:  # type: ignore[no-untyped-def]
    model, _, box, spec = _problem(model_name, batch)

    def run() -> object:
        with torch.enable_grad():
            return alpha_crown(model, box, spec, steps=20,
                               intermediate=Intermediate(intermediate))

    _run(benchmark, f"{model_name}-b{batch}", run, rounds=1)
