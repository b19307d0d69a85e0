"""Hand-computed objectives and margins, input validation, schedules and APGD checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tightrope.attacks import (
    APGDConfig,
    BoxPGDConfig,
    CosineStep,
    FGSMConfig,
    MultiStepDecay,
    Objective,
    PGDConfig,
    apgd,
    apgd_checkpoints,
    box_pgd,
    fgsm,
    margins,
    objective_values,
    pgd,
)

LOGITS = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 1])


def test_margins_by_hand() -> None:
    assert margins(LOGITS, LABELS).tolist() == [1.0 - 3.0, 3.0 - 2.0]


def test_objectives_by_hand() -> None:
    ce = objective_values(LOGITS, LABELS, Objective.CE)
    lse = math.log(math.exp(1) + math.exp(3) + math.exp(2))
    assert ce.tolist() == pytest.approx([lse - 1.0, lse - 3.0], abs=1e-12)
    assert objective_values(LOGITS, LABELS, Objective.MARGIN).tolist() == [2.0, -1.0]
    # DLR: violation / (top1 - top3) = violation / (3 - 1).
    dlr = objective_values(LOGITS, LABELS, Objective.DLR)
    assert dlr.tolist() == pytest.approx([1.0, -0.5], abs=1e-11)


def test_dlr_is_shift_and_scale_invariant() -> None:
    dlr = objective_values(LOGITS, LABELS, Objective.DLR)
    moved = objective_values(7.0 * LOGITS - 4.0, LABELS, Objective.DLR)
    assert torch.allclose(dlr, moved, atol=1e-12)


def test_dlr_needs_three_classes() -> None:
    with pytest.raises(ValueError, match="at least 3 classes"):
        objective_values(LOGITS[:, :2], LABELS.clamp(max=1), Objective.DLR)


def test_schedules() -> None:
    decay = MultiStepDecay(milestones=(0.5, 0.75), gamma=0.1)
    assert [decay.factor(k, 8) for k in range(8)] == pytest.approx(
        [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    cosine = CosineStep()
    assert cosine.factor(0, 10) == 1.0
    assert cosine.factor(5, 10) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="increasing"):
        MultiStepDecay(milestones=(0.75, 0.5))
    with pytest.raises(ValueError, match="gamma"):
        MultiStepDecay(gamma=0.0)


def test_apgd_checkpoints_follow_the_paper() -> None:
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (Croce & Hein 2020, Sec. 3.2).
    assert apgd_checkpoints(100) == (22, 41, 57, 70, 80, 87, 93, 99)
    assert apgd_checkpoints(0) == ()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PGDConfig(steps=-1), "steps"),
        (lambda: PGDConfig(restarts=0), "restarts"),
        (lambda: PGDConfig(step_size=0.0), "step_size"),
        (lambda: FGSMConfig(step_size=-1.0), "step_size"),
        (lambda: FGSMConfig(domain=(1.0, 0.0)), "domain"),
        (lambda: APGDConfig(momentum=0.0), "momentum"),
        (lambda: APGDConfig(rho=1.5), "rho"),
        (lambda: BoxPGDConfig(restarts=0), "restarts"),
    ],
)
def test_configs_reject_bad_values(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


def test_configs_are_frozen() -> None:
    config = PGDConfig()
    with pytest.raises(AttributeError):
        config.steps = 3  # type: ignore[misc]


def _seeded_linear(inputs: int, outputs: int, seed: int = 0) -> nn.Linear:
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(inputs, outputs).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(outputs, inputs, generator=generator, dtype=torch.float64))
        layer.bias.copy_(torch.randn(outputs, generator=generator, dtype=torch.float64))
    return layer


MODEL = _seeded_linear(4, 3)
X = torch.full((2, 4), 0.5, dtype=torch.float64)
Y = torch.tensor([0, 2])


def test_input_errors_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        fgsm(MODEL, X, Y, -0.1)
    with pytest.raises(ValueError, match="domain"):
        fgsm(MODEL, X + 1.0, Y, 0.1)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        fgsm(MODEL, X, Y[:1], 0.1)
    with pytest.raises(TypeError, match="integer"):
        fgsm(MODEL, X, Y.double(), 0.1)
    with pytest.raises(TypeError, match="floating"):
        fgsm(MODEL, X.long(), Y, 0.1)
    with pytest.raises(ValueError, match="labels must lie"):
        fgsm(MODEL, X, torch.tensor([0, 3]), 0.1)
    with pytest.raises(ValueError, match="broadcastable"):
        fgsm(MODEL, X, Y, torch.full((3,), 0.1))
    with pytest.raises(ValueError, match="lower <= upper"):
        box_pgd(MODEL, X, X - 0.1, Y, config=BoxPGDConfig(random_start=False))


def test_randomness_needs_a_generator() -> None:
    with pytest.raises(ValueError, match="generator"):
        pgd(MODEL, X, Y, 0.1)
    with pytest.raises(ValueError, match="generator"):
        apgd(MODEL, X, Y, 0.1, config=APGDConfig(random_start=False, restarts=2))
    # Deterministic settings need none.
    pgd(MODEL, X, Y, 0.1, config=PGDConfig(random_start=False))


def test_zero_eps_returns_the_input() -> None:
    eps = torch.tensor([0.0, 0.2], dtype=torch.float64)
    config = PGDConfig(random_start=False, steps=5, early_stop=False)
    result = pgd(MODEL, X, Y, eps, config=config)
    assert torch.equal(result.x_adv[0], X[0])
    assert not torch.equal(result.x_adv[1], X[1])


def test_the_same_seed_gives_the_same_attack() -> None:
    config = PGDConfig(steps=3, restarts=2)
    first = pgd(MODEL, X, Y, 0.1, config=config, generator=torch.Generator().manual_seed(3))
    again = pgd(MODEL, X, Y, 0.1, config=config, generator=torch.Generator().manual_seed(3))
    small_step = FGSMConfig(random_start=True, step_size=0.5)
    seed_4 = fgsm(MODEL, X, Y, 0.1, config=small_step, generator=torch.Generator().manual_seed(4))
    seed_5 = fgsm(MODEL, X, Y, 0.1, config=small_step, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.x_adv, again.x_adv)
    assert not torch.equal(seed_4.x_adv, seed_5.x_adv)


def test_a_config_is_an_attack() -> None:
    config = FGSMConfig(step_size=0.5)
    called = config(MODEL, X, Y, 0.1)
    direct = fgsm(MODEL, X, Y, 0.1, config=config)
    assert torch.equal(called.x_adv, direct.x_adv)
