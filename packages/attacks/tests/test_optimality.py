"""Known worst cases: on linear models the optimal l_inf attack has a closed form.

For logits ``z = W x + b`` the worst margin of class ``j`` over a box is reached at the vertex
``x_i = upper_i`` where ``(w_j - w_y)_i > 0`` and ``lower_i`` elsewhere. With two classes that
vertex is the worst case of the classification margin, so FGSM from ``x`` is exactly optimal
and PGD/APGD must reach it; with many classes each TAPS estimator must reach its own vertex.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tightrope.attacks import (
    APGDConfig,
    BoxPGDConfig,
    FGSMConfig,
    MultiEstimatorConfig,
    Objective,
    PGDConfig,
    apgd,
    box_pgd,
    fgsm,
    margins,
    multi_estimator_box_pgd,
    pgd,
)

EPS = 0.1
SHAPE = (1, 4, 4)


def _linear(features: int, classes: int, seed: int) -> nn.Linear:
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(features, classes).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(classes, features, generator=generator, dtype=torch.float64))
        layer.bias.copy_(torch.randn(classes, generator=generator, dtype=torch.float64))
    return layer


def _worst_margins(layer: nn.Linear, lower: Tensor, upper: Tensor, y: Tensor) -> Tensor:
    """``min over the box of z_y - z_j`` for every class: ``(B, K)`` (0 at j = y)."""
    difference = layer.weight.unsqueeze(0) - layer.weight[y].unsqueeze(1)  # (B, K, d): w_j - w_y
    flat_lower, flat_upper = lower.flatten(1).unsqueeze(1), upper.flatten(1).unsqueeze(1)
    vertex = torch.where(difference > 0, flat_upper, flat_lower)
    worst_violation = (difference * vertex).sum(2) + layer.bias - layer.bias[y].unsqueeze(1)
    return -worst_violation


@pytest.fixture
def binary_problem() -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """A two-class linear model on 1x4x4 images, inputs with edge pixels, labels, optimum."""
    layer = _linear(16, 2, seed=1)
    model = nn.Sequential(nn.Flatten(), layer)
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(32, *SHAPE, generator=generator, dtype=torch.float64)
    x[:, 0, 0] = torch.tensor([0.0, 1.0, 0.02, 0.99], dtype=torch.float64)  # clipped corners
    y = torch.randint(0, 2, (32,), generator=generator)
    lower, upper = (x - EPS).clamp(0, 1), (x + EPS).clamp(0, 1)
    optimum = _worst_margins(layer, lower, upper, y).gather(1, (1 - y).unsqueeze(1)).squeeze(1)
    return model, x, y, optimum


def _margin_at(model: nn.Module, x_adv: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return margins(model(x_adv), y)


@pytest.mark.parametrize("objective", [Objective.CE, Objective.MARGIN])
def test_fgsm_is_exactly_optimal(
    binary_problem: tuple[nn.Module, Tensor, Tensor, Tensor], objective: Objective
) -> None:
    model, x, y, optimum = binary_problem
    plain = fgsm(model, x, y, EPS, config=FGSMConfig(objective=objective))
    assert torch.allclose(_margin_at(model, plain.x_adv, y), optimum, rtol=0, atol=1e-12)
    # The expressive losses' attack: a random start and a step of 10 eps land on the vertex.
    vertex_config = FGSMConfig(objective=objective, step_size=10.0, random_start=True)
    generator = torch.Generator().manual_seed(0)
    vertex = fgsm(model, x, y, EPS, config=vertex_config, generator=generator)
    assert torch.allclose(_margin_at(model, vertex.x_adv, y), optimum, rtol=0, atol=1e-12)


@pytest.mark.parametrize("objective", [Objective.CE, Objective.MARGIN])
@pytest.mark.parametrize("use_apgd", [False, True])
def test_pgd_and_apgd_reach_the_optimum(
    binary_problem: tuple[nn.Module, Tensor, Tensor, Tensor],
    objective: Objective,
    use_apgd: bool,
) -> None:
    model, x, y, optimum = binary_problem
    generator = torch.Generator().manual_seed(0)
    if use_apgd:
        config = APGDConfig(steps=100, objective=objective, early_stop=False)
        result = apgd(model, x, y, EPS, config=config, generator=generator)
    else:
        pgd_config = PGDConfig(steps=100, objective=objective, early_stop=False)
        result = pgd(model, x, y, EPS, config=pgd_config, generator=generator)
    reached = _margin_at(model, result.x_adv, y)
    assert torch.allclose(reached, optimum, rtol=0, atol=1e-4)
    assert torch.equal(result.success, optimum <= 0)
    assert bool((result.success).any())
    assert bool((~result.success).any())


def test_a_short_pgd_does_not_reach_the_optimum(
    binary_problem: tuple[nn.Module, Tensor, Tensor, Tensor],
) -> None:
    # The optimality test above can fail: two tiny steps from a random start stay inside.
    model, x, y, optimum = binary_problem
    config = PGDConfig(steps=2, step_size=0.1, early_stop=False)
    result = pgd(model, x, y, EPS, config=config, generator=torch.Generator().manual_seed(0))
    assert bool((_margin_at(model, result.x_adv, y) > optimum + 1e-3).all())


def test_box_pgd_reaches_the_optimum_in_a_box() -> None:
    layer = _linear(6, 2, seed=3)
    generator = torch.Generator().manual_seed(4)
    centre = torch.randn(16, 6, generator=generator, dtype=torch.float64)
    half_width = torch.rand(16, 6, generator=generator, dtype=torch.float64)
    lower, upper = centre - half_width, centre + half_width
    y = torch.randint(0, 2, (16,), generator=generator)
    config = BoxPGDConfig(steps=50, objective=Objective.MARGIN, early_stop=False)
    result = box_pgd(layer, lower, upper, y, config=config, generator=generator)
    optimum = _worst_margins(layer, lower, upper, y).gather(1, (1 - y).unsqueeze(1)).squeeze(1)
    assert torch.allclose(_margin_at(layer, result.x_adv, y), optimum, rtol=0, atol=1e-4)


def test_each_estimator_reaches_its_class_optimum() -> None:
    classes = 7
    layer = _linear(6, classes, seed=5)
    generator = torch.Generator().manual_seed(6)
    centre = torch.randn(12, 6, generator=generator, dtype=torch.float64)
    half_width = torch.rand(12, 6, generator=generator, dtype=torch.float64)
    lower, upper = centre - half_width, centre + half_width
    y = torch.randint(0, classes, (12,), generator=generator)
    found = multi_estimator_box_pgd(
        layer, lower, upper, y, config=MultiEstimatorConfig(steps=20), generator=generator
    )
    optimum = _worst_margins(layer, lower, upper, y).gather(1, found.classes)
    assert torch.allclose(found.margins, optimum, rtol=0, atol=1e-4)
    # A single CE attack finds one point; its margin for every class is no smaller.
    single = box_pgd(
        layer,
        lower,
        upper,
        y,
        config=BoxPGDConfig(steps=20, early_stop=False),
        generator=generator,
    )
    with torch.no_grad():
        logits = layer(single.x_adv)
    single_margins = logits.gather(1, y.unsqueeze(1)) - logits.gather(1, found.classes)
    assert bool((found.margins <= single_margins + 1e-9).all())
    assert bool((found.margins < single_margins - 1e-3).any())  # and strictly smaller somewhere
