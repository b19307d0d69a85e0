"""Property tests: every returned point lies in the eps ball ∩ [0, 1] (or in the given box),
for random shapes, radii, dtypes and settings; results are consistent with a forward pass."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from tightrope.attacks import (
    APGDConfig,
    AttackResult,
    BoxPGDConfig,
    CosineStep,
    FGSMConfig,
    MultiEstimatorConfig,
    MultiStepDecay,
    Objective,
    PGDConfig,
    apgd,
    box_pgd,
    fgsm,
    margins,
    multi_estimator_box_pgd,
    objective_values,
    pgd,
)

DTYPES = st.sampled_from([torch.float32, torch.float64])
SHAPES = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True)


def _model(features: int, classes: int, dtype: torch.dtype, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # tests only: the library itself never touches the global RNG
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 8), nn.ReLU(), nn.Linear(8, classes)).to(
        dtype
    )


def _inputs(
    batch: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int
) -> tuple[Tensor, torch.Generator]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *shape, generator=generator, dtype=dtype)
    # Put some coordinates on the domain's edges, where clipping matters.
    edge = torch.rand(x.shape, generator=generator) < 0.2
    x = torch.where(edge, (x > 0.5).to(dtype), x)
    return x, generator


def _assert_in_ball(result: AttackResult, x: Tensor, eps: Tensor) -> None:
    x_adv = result.x_adv
    assert x_adv.shape == x.shape
    assert x_adv.dtype == x.dtype
    assert not x_adv.requires_grad
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    assert bool((x_adv >= lower).all())
    assert bool((x_adv <= upper).all())
    assert bool((x_adv >= 0).all())
    assert bool((x_adv <= 1).all())
    # |x_adv - x| <= eps up to the one rounding of x -/+ eps.
    assert bool(((x_adv - x).abs() <= eps + torch.finfo(x.dtype).eps).all())
    assert result.success.shape == (x.shape[0],)
    assert result.success.dtype == torch.bool
    assert result.loss.shape == (x.shape[0],)


def _assert_consistent(
    result: AttackResult, model: nn.Module, y: Tensor, objective: Objective
) -> None:
    """The reported success and loss are those of a plain forward pass at ``x_adv``."""
    with torch.no_grad():
        logits = model(result.x_adv)
    assert torch.equal(result.success, margins(logits, y) <= 0)
    expected = objective_values(logits, y, objective)
    assert torch.allclose(result.loss, expected, rtol=1e-5, atol=1e-5)


def _eps(draw_per_sample: bool, radius: float, batch: int, x: Tensor) -> Tensor:
    if draw_per_sample:
        radii = torch.linspace(0.0, radius, batch, dtype=x.dtype)
        return radii.view(-1, *([1] * (x.dim() - 1)))
    return torch.tensor(radius, dtype=x.dtype)


@PROPERTY
@given(
    batch=st.integers(1, 5),
    shape=SHAPES,
    classes=st.integers(2, 5),
    dtype=DTYPES,
    radius=st.floats(0.0, 0.6),
    per_sample=st.booleans(),
    random_start=st.booleans(),
    step_size=st.sampled_from([0.5, 1.0, 10.0]),
    seed=st.integers(0, 2**16),
)
def test_fgsm_stays_in_the_ball(
    batch: int,
    shape: tuple[int, ...],
    classes: int,
    dtype: torch.dtype,
    radius: float,
    per_sample: bool,
    random_start: bool,
    step_size: float,
    seed: int,
) -> None:
    x, generator = _inputs(batch, shape, dtype, seed)
    model = _model(math.prod(shape), classes, dtype, seed)
    y = torch.randint(0, classes, (batch,), generator=generator)
    eps = _eps(per_sample, radius, batch, x)
    config = FGSMConfig(step_size=step_size, random_start=random_start)
    eps_arg = eps.flatten() if per_sample else radius  # a (B,) tensor or a float
    result = fgsm(model, x, y, eps_arg, config=config, generator=generator)
    _assert_in_ball(result, x, eps)
    if dtype is torch.float64:
        _assert_consistent(result, model, y, config.objective)


@PROPERTY
@given(
    batch=st.integers(1, 5),
    shape=SHAPES,
    classes=st.integers(3, 5),
    dtype=DTYPES,
    radius=st.floats(0.0, 0.6),
    per_sample=st.booleans(),
    use_apgd=st.booleans(),
    objective=st.sampled_from(list(Objective)),
    restarts=st.integers(1, 3),
    schedule=st.sampled_from([None, CosineStep(), MultiStepDecay()]),
    seed=st.integers(0, 2**16),
)
def test_pgd_and_apgd_stay_in_the_ball(
    batch: int,
    shape: tuple[int, ...],
    classes: int,
    dtype: torch.dtype,
    radius: float,
    per_sample: bool,
    use_apgd: bool,
    objective: Objective,
    restarts: int,
    schedule: CosineStep | MultiStepDecay | None,
    seed: int,
) -> None:
    x, generator = _inputs(batch, shape, dtype, seed)
    model = _model(math.prod(shape), classes, dtype, seed)
    y = torch.randint(0, classes, (batch,), generator=generator)
    eps = _eps(per_sample, radius, batch, x)
    if use_apgd:
        config = APGDConfig(steps=6, restarts=restarts, objective=objective)
        result = apgd(model, x, y, eps, config=config, generator=generator)
    else:
        pgd_config = (
            PGDConfig(steps=6, restarts=restarts, objective=objective, step_size=0.5)
            if schedule is None
            else PGDConfig(steps=6, restarts=restarts, objective=objective, schedule=schedule)
        )
        result = pgd(model, x, y, eps, config=pgd_config, generator=generator)
    _assert_in_ball(result, x, eps)
    if dtype is torch.float64:
        _assert_consistent(result, model, y, objective)


@PROPERTY
@given(
    batch=st.integers(1, 4),
    shape=SHAPES,
    classes=st.integers(2, 5),
    dtype=DTYPES,
    scale=st.floats(0.0, 3.0),
    random_start=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_box_attacks_stay_in_the_box(
    batch: int,
    shape: tuple[int, ...],
    classes: int,
    dtype: torch.dtype,
    scale: float,
    random_start: bool,
    seed: int,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    centre = 4 * torch.randn(batch, *shape, generator=generator, dtype=dtype)
    half_width = scale * torch.rand(batch, *shape, generator=generator, dtype=dtype)
    lower, upper = centre - half_width, centre + half_width
    model = _model(math.prod(shape), classes, dtype, seed)
    y = torch.randint(0, classes, (batch,), generator=generator)

    single = box_pgd(
        model,
        lower,
        upper,
        y,
        config=BoxPGDConfig(steps=5, restarts=2, random_start=random_start),
        generator=generator,
    )
    assert single.x_adv.shape == lower.shape
    assert single.x_adv.dtype == dtype
    assert bool((single.x_adv >= lower).all())
    assert bool((single.x_adv <= upper).all())

    found = multi_estimator_box_pgd(
        model,
        lower,
        upper,
        y,
        config=MultiEstimatorConfig(steps=5, random_start=random_start),
        generator=generator,
    )
    assert found.points.shape == (batch, classes - 1, *shape)
    assert found.margins.shape == found.classes.shape == (batch, classes - 1)
    assert bool((found.points >= lower.unsqueeze(1)).all())
    assert bool((found.points <= upper.unsqueeze(1)).all())
    assert bool((found.classes != y.unsqueeze(1)).all())
    if dtype is torch.float64:
        # Each margin is z_y - z_j at its own point.
        with torch.no_grad():
            logits = model(found.points.flatten(0, 1)).view(batch, classes - 1, classes)
        true = logits.gather(2, y.view(-1, 1, 1).expand(-1, classes - 1, 1)).squeeze(2)
        other = logits.gather(2, found.classes.unsqueeze(2)).squeeze(2)
        assert torch.allclose(found.margins, true - other, atol=1e-10)
