"""The checks warn about the mistakes they name, and stay silent on a plain logit model."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from tightrope.attacks import (
    EvaluationWarning,
    ModelMode,
    check_determinism,
    check_input_gradients,
    check_model,
    check_outputs,
)

X = torch.rand(8, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def _logits() -> nn.Module:
    torch.manual_seed(0)  # tests only: initialises the layers
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()


@contextlib.contextmanager
def warnings_as_errors() -> Iterator[None]:
    """Turn EvaluationWarnings into errors inside the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluationWarning)
        yield


class Rounded(nn.Module):
    """Rounds its input: a classic source of zero gradients (masking)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.round(x * 4) / 4


def test_a_plain_model_passes_every_check() -> None:
    with warnings_as_errors():
        assert check_model(_logits(), X, Y) == ()


def test_softmax_outputs_are_flagged() -> None:
    with pytest.warns(EvaluationWarning, match="probabilities"):
        found = check_outputs(nn.Sequential(_logits(), nn.Softmax(dim=1)), X)
    assert len(found) == 1


def test_log_softmax_outputs_are_flagged() -> None:
    with pytest.warns(EvaluationWarning, match="log-probabilities"):
        check_outputs(nn.Sequential(_logits(), nn.LogSoftmax(dim=1)), X)


def test_zero_input_gradients_are_flagged() -> None:
    with pytest.warns(EvaluationWarning, match="8 of 8 samples have an exactly zero"):
        check_input_gradients(nn.Sequential(Rounded(), _logits()), X, Y)


def test_non_finite_gradients_are_flagged() -> None:
    class Sqrt(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.sqrt(x - x[:, :1])  # sqrt(0) in the first column: infinite slope

    with pytest.warns(EvaluationWarning, match="non-finite"):
        check_input_gradients(nn.Sequential(Sqrt(), _logits()), X, Y)


def test_randomness_is_flagged_in_the_mode_it_shows() -> None:
    model = nn.Sequential(_logits(), nn.Dropout(0.5)).train()
    with warnings_as_errors():
        assert check_determinism(model, X) == ()  # eval mode: dropout is off
    with pytest.warns(EvaluationWarning, match="not deterministic"):
        check_determinism(model, X, mode=ModelMode.KEEP)
    assert model.training  # and the caller's mode is back


def test_determinism_needs_two_passes() -> None:
    with pytest.raises(ValueError, match="repeats"):
        check_determinism(_logits(), X, repeats=1)
