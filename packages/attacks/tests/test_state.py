"""Attacks leave the model as they found it: modes, requires_grad flags, gradients, statistics."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from tightrope.attacks import (
    APGDConfig,
    BoxPGDConfig,
    FGSMConfig,
    ModelMode,
    MultiEstimatorConfig,
    PGDConfig,
    apgd,
    box_pgd,
    check_model,
    fgsm,
    frozen_model,
    multi_estimator_box_pgd,
    pgd,
)

EPS = 0.1


class ModeRecorder(nn.Module):
    """Identity that records its ``training`` flag at every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(self.training)
        return x


def _model() -> nn.Sequential:
    torch.manual_seed(0)  # tests only: initialises the layers
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.2),
        ModeRecorder(),
        nn.Flatten(),
        nn.Linear(64, 3),
    ).double()
    model.train()
    model[3].eval()  # mixed modes must come back as they were, module by module
    model[0].weight.requires_grad_(False)  # and so must mixed requires_grad flags
    model[6].bias.grad = torch.zeros_like(model[6].bias)
    return model


X = torch.rand(6, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
Y = torch.tensor([0, 1, 2, 0, 1, 2])


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


ATTACKS: dict[str, Callable[[nn.Module], object]] = {
    "fgsm": lambda m: fgsm(
        m, X, Y, EPS, config=FGSMConfig(random_start=True), generator=_generator()
    ),
    "pgd": lambda m: pgd(
        m, X, Y, EPS, config=PGDConfig(steps=3, restarts=2), generator=_generator()
    ),
    "apgd": lambda m: apgd(
        m, X, Y, EPS, config=APGDConfig(steps=5, restarts=2), generator=_generator()
    ),
    "box_pgd": lambda m: box_pgd(
        m, X - EPS, X + EPS, Y, config=BoxPGDConfig(steps=3), generator=_generator()
    ),
    "multi": lambda m: multi_estimator_box_pgd(
        m, X - EPS, X + EPS, Y, config=MultiEstimatorConfig(steps=3), generator=_generator()
    ),
    "checks": lambda m: check_model(m, X, Y),
}


def _snapshot(model: nn.Module) -> tuple[list[bool], list[bool], dict[str, Tensor]]:
    return (
        [module.training for module in model.modules()],
        [parameter.requires_grad for parameter in model.parameters()],
        {name: value.clone() for name, value in model.state_dict().items()},
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attacks_restore_the_model(name: str) -> None:
    model = _model()
    modes, flags, state = _snapshot(model)
    ATTACKS[name](model)
    after_modes, after_flags, after_state = _snapshot(model)
    assert after_modes == modes
    assert after_flags == flags
    # Eval mode during the attack: BatchNorm statistics and all weights are untouched.
    assert state.keys() == after_state.keys()
    assert all(torch.equal(state[key], after_state[key]) for key in state)
    # No parameter gradient is created or accumulated.
    for parameter_name, parameter in model.named_parameters():
        if parameter_name == "6.bias":
            assert parameter.grad is not None
            assert bool((parameter.grad == 0).all())
        else:
            assert parameter.grad is None, parameter_name
    recorder = model[4]
    assert isinstance(recorder, ModeRecorder)
    assert recorder.seen
    assert not any(recorder.seen)


def test_keep_mode_runs_in_the_callers_mode() -> None:
    model = _model()
    modes, flags, _ = _snapshot(model)
    config = PGDConfig(steps=2, model_mode=ModelMode.KEEP)
    pgd(model, X, Y, EPS, config=config, generator=_generator())
    recorder = model[4]
    assert isinstance(recorder, ModeRecorder)
    assert recorder.seen
    assert all(recorder.seen)
    assert _snapshot(model)[:2] == (modes, flags)


def test_frozen_model_restores_after_an_error() -> None:
    model = _model()
    modes, flags, _ = _snapshot(model)
    inside: list[bool] = []

    def fail_inside() -> None:
        with frozen_model(model):
            inside.append(any(parameter.requires_grad for parameter in model.parameters()))
            inside.append(any(module.training for module in model.modules()))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    assert inside == [False, False]
    assert _snapshot(model)[:2] == (modes, flags)


def test_attacks_work_under_no_grad_and_return_detached_results() -> None:
    model = _model().eval()
    with torch.no_grad():
        result = pgd(model, X, Y, EPS, config=PGDConfig(steps=3), generator=_generator())
    assert not result.x_adv.requires_grad
    assert not result.loss.requires_grad
    assert not torch.equal(result.x_adv, X)


def test_inference_mode_is_refused_not_silently_ignored() -> None:
    model = _model().eval()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        pgd(model, X, Y, EPS, config=PGDConfig(steps=3), generator=_generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_cuda_float32() -> None:
    device = torch.device("cuda")
    model = _model().float().to(device)
    x, y = X.float().to(device), Y.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    for result in (
        pgd(model, x, y, EPS, config=PGDConfig(steps=3, restarts=2), generator=generator),
        apgd(model, x, y, EPS, config=APGDConfig(steps=5), generator=generator),
    ):
        assert result.x_adv.device.type == "cuda"
        assert bool(((result.x_adv - x).abs() <= EPS + 1e-6).all())
