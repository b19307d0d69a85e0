"""compile_kernels(): the compiled ReLU step of the backward pass and the compiled interval ReLU
of IBP equal the eager ones (values and gradients, every layout and gradient variant), bounds
stay sound with them, and a compiler failure falls back to eager computation with a warning."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

import tightrope.bounds.fused as fused
from tightrope.bounds import (
    Box,
    alpha_crown,
    compile_kernels,
    crown,
    crown_ibp,
    ibp,
    kernels_compiled,
    margin_spec,
)
from tightrope.bounds.relaxation import LowerSlope, relu_relaxation


@pytest.fixture
def compiled() -> Iterator[None]:
    assert compile_kernels(True, after_elements=0), "torch.compile should work here"
    yield
    fused._settings.failed = False
    compile_kernels(False)


def _inputs(
    shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, per_row: bool,
) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(sum(shape))
    batch, rows, features = shape[0], shape[1], shape[2:]
    A = torch.randn(shape, dtype=dtype, generator=generator)
    lower = torch.randn((batch, *features), dtype=dtype, generator=generator)
    upper = lower + torch.rand((batch, *features), dtype=dtype, generator=generator)
    slopes = torch.rand((batch, rows if per_row else 1, *features), dtype=dtype,
                        generator=generator)
    if channels_last:
        A = A.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        lower = lower.contiguous(memory_format=torch.channels_last)
        upper = upper.contiguous(memory_format=torch.channels_last)
    bias = torch.randn((batch, rows), dtype=dtype, generator=generator)
    return A, bias, slopes, lower, upper


def _step(step: object, A: Tensor, bias: Tensor, slopes: Tensor, lower: Tensor,
          upper: Tensor) -> tuple[Tensor, Tensor]:
    # The relaxation's chord and intercept as functions of the bounds, so that gradients
    # reach the bounds as they do in training.
    width = (upper - lower).clamp(min=1e-3)
    chord = upper.clamp(min=0) / width
    intercept = -chord * lower.clamp(max=0)
    assert callable(step)
    result: tuple[Tensor, Tensor] = step(A, bias, slopes, chord, intercept)
    return result


# shape, dtype, channels-last coefficients, per-row (alpha) slopes. Each variant compiles for
# seconds on first use; the fast suite keeps the layout of the convolutional output pass.
VARIANTS = [
    pytest.param((3, 4, 5, 6, 7), torch.float32, False, False, marks=pytest.mark.slow),
    ((3, 4, 5, 6, 7), torch.float32, True, False),
    pytest.param((3, 4, 5, 6, 7), torch.float64, True, True, marks=pytest.mark.slow),
    pytest.param((3, 4, 11), torch.float64, False, False, marks=pytest.mark.slow),
    pytest.param((3, 4, 11), torch.float32, False, True, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("shape", "dtype", "channels_last", "per_row"), VARIANTS)
@pytest.mark.usefixtures("compiled")
def test_compiled_step_equals_eager_in_values_and_gradients(
    shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, per_row: bool,
) -> None:
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    results = []
    for step in (fused.relu_step_eager, fused.relu_step):
        leaves = [t.clone().requires_grad_(True) for t in _inputs(shape, dtype, channels_last,
                                                                     per_row)]
        out, bias = _step(step, *leaves)
        generator = torch.Generator().manual_seed(7)
        weights = torch.randn(out.shape, dtype=dtype, generator=generator)
        loss = (out * weights).sum() + (bias * torch.arange(bias.numel(), dtype=dtype)
                                        .view(bias.shape)).sum()
        grads = torch.autograd.grad(loss, leaves)
        results.append((out.detach(), bias.detach(), *grads))
    for eager, compiled_value in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(compiled_value, eager, **tol)
    # The layout of the coefficients is kept (the next transposed convolution relies on it).
    if channels_last:
        assert results[1][0].permute(0, 1, 3, 4, 2).is_contiguous()


@pytest.mark.usefixtures("compiled")
def test_compiled_step_without_gradients_and_in_inference_mode() -> None:
    inputs = _inputs((2, 3, 4, 5, 5), torch.float32, True, False)
    expected = _step(fused.relu_step_eager, *inputs)
    with torch.no_grad():
        found = _step(fused.relu_step, *inputs)
    with torch.inference_mode():
        found_inference = _step(fused.relu_step, *inputs)
    for value in (found, found_inference):
        torch.testing.assert_close(value[0], expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(value[1], expected[1], rtol=1e-5, atol=1e-5)


def _cnn() -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=1, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5),
    ).double().eval()


def test_bounds_with_compiled_kernels_equal_eager_and_are_sound(compiled: None) -> None:
    model = _cnn()
    with torch.no_grad():
        model[3].running_mean.uniform_(-0.2, 0.2)
        model[3].running_var.uniform_(0.5, 2.0)
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64, generator=generator)
    y = torch.arange(6) % 5
    box, C = Box.from_linf(x, 0.08), margin_spec(y, 5, dtype=torch.float64)
    functions = {
        "ibp": lambda: ibp(model, box, C),
        "crown": lambda: crown(model, box, C),
        "crown_ibp": lambda: crown_ibp(model, box, C),
        "alpha_crown": lambda: alpha_crown(model, box, C, steps=5),
    }
    found = {}
    for enabled in (False, True):
        compile_kernels(enabled, after_elements=0)
        assert kernels_compiled() == enabled
        for name, function in functions.items():
            found[name, enabled] = function()
    points = box.lower + (box.upper - box.lower) * torch.rand(
        (512, *box.shape), dtype=torch.float64, generator=generator)
    with torch.no_grad():
        values = torch.einsum("bkn,sbn->sbk", C, model(points.flatten(0, 1)).view(512, 6, 5))
    for name in functions:
        eager, compiled_bounds = found[name, False], found[name, True]
        torch.testing.assert_close(compiled_bounds.lower, eager.lower, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(compiled_bounds.upper, eager.upper, rtol=1e-10, atol=1e-10)
        assert bool((values >= compiled_bounds.lower - 1e-9).all()), name
        assert bool((values <= compiled_bounds.upper + 1e-9).all()), name
    # Training differentiates through the compiled steps: parameter gradients agree too.
    for bound in (lambda: crown_ibp(model, box, C, upper=False).lower,
                  lambda: ibp(model, box, C).lower):
        gradients = []
        for enabled in (False, True):
            compile_kernels(enabled, after_elements=0)
            model.zero_grad()
            bound().sum().backward()
            gradients.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        for eager, compiled_gradient in zip(*gradients, strict=True):
            torch.testing.assert_close(compiled_gradient, eager, rtol=1e-10, atol=1e-10)


def test_compiler_failure_falls_back_to_eager_with_one_warning(
    compiled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_compile(function: object, **options: object) -> object:
        def run(*args: object) -> object:
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_working", set())
    monkeypatch.setattr(torch, "compile", broken_compile)
    inputs = _inputs((2, 3, 7), torch.float64, False, False)
    expected = _step(fused.relu_step_eager, *inputs)
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler"):
        found = _step(fused.relu_step, *inputs)
    torch.testing.assert_close(found[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(found[1], expected[1], rtol=0, atol=0)
    assert not kernels_compiled()
    assert not compile_kernels(True), "a failed compiler stays off for the process"


def test_bad_inputs_raise_their_own_error_and_keep_compilation_on(compiled: None) -> None:
    A, bias, slopes, lower, upper = _inputs((2, 3, 7), torch.float64, False, False)
    with pytest.raises(RuntimeError, match="size"):
        _step(fused.relu_step, A, bias, slopes, lower[:, :5], upper[:, :5])
    assert kernels_compiled()


def test_a_variant_runs_eagerly_until_it_has_processed_after_elements(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compiled_functions: list[object] = []

    def recording_compile(function: object, **options: object) -> object:
        compiled_functions.append(function)
        return function

    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_working", set())
    monkeypatch.setattr(torch, "compile", recording_compile)
    inputs = _inputs((2, 3, 7), torch.float64, False, False)  # 42 elements per call
    try:
        assert compile_kernels(True, after_elements=100)
        for _ in range(3):  # 0, 42, 84 elements processed before these calls: eager
            _step(fused.relu_step, *inputs)
        assert compiled_functions == []
        _step(fused.relu_step, *inputs)  # 126 >= 100: compiles
        _step(fused.relu_step, *inputs)
        assert len(compiled_functions) == 1
    finally:
        compile_kernels(False)
    with pytest.raises(ValueError, match="after_elements"):
        compile_kernels(True, after_elements=-1)


def _interval(
    shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool
) -> tuple[Tensor, Tensor]:
    """Centres and radii with every case of the ReLU: off, on, unstable, and the ties
    ``c = r`` (lower bound exactly 0) and ``c = r = 0`` (dead padding) where the
    gradients of the two eager formulas would differ."""
    generator = torch.Generator().manual_seed(sum(shape))
    center = torch.randn(shape, dtype=dtype, generator=generator)
    radius = torch.rand(shape, dtype=dtype, generator=generator)
    flat_center, flat_radius = center.view(-1), radius.view(-1)
    flat_center[::7] = flat_radius[::7]
    flat_center[1::11] = 0.0
    flat_radius[1::11] = 0.0
    if channels_last:
        center = center.contiguous(memory_format=torch.channels_last)
        radius = radius.contiguous(memory_format=torch.channels_last)
    return center, radius


def _interval_step(
    step: object, shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, grad: bool
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``step`` on the inputs of :func:`_interval`: the output centre and radius, and their
    values with (when ``grad``) the gradients of a fixed weighted sum in both inputs."""
    leaves = [t.clone().requires_grad_(grad) for t in _interval(shape, dtype, channels_last)]
    with torch.set_grad_enabled(grad):
        center, radius = step(*leaves)  # type: ignore[operator]
    found = [center.detach(), radius.detach()]
    if grad:
        weights = torch.randn((2, *shape), dtype=dtype, generator=torch.Generator().manual_seed(3))
        found += torch.autograd.grad((center * weights[0] + radius * weights[1]).sum(), leaves)
    return center, radius, found


# shape, dtype, channels-last, with gradients. Each variant compiles for seconds on first use.
INTERVAL_VARIANTS = [
    ((4, 6, 5, 5), torch.float32, True, False),
    ((4, 6, 5, 5), torch.float64, True, True),
    pytest.param((4, 6, 5, 5), torch.float64, False, False, marks=pytest.mark.slow),
    pytest.param((5, 13), torch.float32, False, True, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("shape", "dtype", "channels_last", "grad"), INTERVAL_VARIANTS)
@pytest.mark.usefixtures("compiled")
def test_compiled_interval_relu_equals_eager_in_values_gradients_and_layout(
    shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, grad: bool,
) -> None:
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    results = []
    for step in (fused.relu_interval_eager, fused.relu_interval):
        center, radius, found = _interval_step(step, shape, dtype, channels_last, grad)
        assert center.shape == shape
        assert radius.shape == shape
        assert center.stride() == _interval(shape, dtype, channels_last)[0].stride(), (
            "the layout is kept")
        results.append(found)
    for eager, compiled_value in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(compiled_value, eager, **tol)
    # The values are those of the interval itself: relu of both ends.
    center, radius = _interval(shape, dtype, channels_last)
    torch.testing.assert_close(results[1][0] - results[1][1], (center - radius).relu(), **tol)
    torch.testing.assert_close(results[1][0] + results[1][1], (center + radius).relu(), **tol)


@pytest.mark.usefixtures("compiled")
def test_compiled_interval_relu_has_the_eager_second_derivatives() -> None:
    # create_graph=True (e.g. a gradient penalty): the backward of the compiled interval ReLU
    # runs the eager formula, differentiable in the incoming gradients.
    shape = (3, 4, 5, 5)
    results = []
    for step in (fused.relu_interval_eager, fused.relu_interval):
        leaves = [t.clone().requires_grad_(True)
                  for t in _interval(shape, torch.float64, True)]
        weights = torch.randn((2, *shape), dtype=torch.float64,
                              generator=torch.Generator().manual_seed(5), requires_grad=True)
        center, radius = step(*leaves)
        grads = torch.autograd.grad((center * weights[0] + radius * weights[1]).sum(), leaves,
                                    create_graph=True)
        penalty = sum((g * g).sum() for g in grads)
        assert isinstance(penalty, Tensor)
        (second,) = torch.autograd.grad(penalty, [weights])
        results.append([*(g.detach() for g in grads), second])
    for eager, compiled_value in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(compiled_value, eager, rtol=1e-12, atol=1e-12)
    assert results[1][-1].abs().sum() > 0, "the penalty depends on the weights"


@pytest.mark.usefixtures("compiled")
def test_interval_relu_of_mismatched_layouts_runs_eagerly() -> None:
    center, radius = _interval((2, 3, 4, 4), torch.float32, False)
    radius = radius.contiguous(memory_format=torch.channels_last)
    before = len(fused._compiled)
    with torch.no_grad():
        found = fused.relu_interval(center, radius)
    expected = fused.relu_interval_eager(center, radius)
    assert len(fused._compiled) == before
    torch.testing.assert_close(found[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(found[1], expected[1], rtol=0, atol=0)


@pytest.mark.parametrize("compiled_kernels", [True, False], ids=["compiled", "eager"])
@pytest.mark.parametrize(("channels_last", "grad", "dtype"), [
    (False, False, torch.float32), (True, False, torch.float32), (False, True, torch.float64),
])
def test_interval_relu_to_channels_last_writes_that_layout(
    compiled_kernels: bool, channels_last: bool, grad: bool, dtype: torch.dtype
) -> None:
    # IBP's first ReLU after a single-channel convolution in NCHW: the values of the interval
    # ReLU, written channels-last (gradients pass through unchanged).
    shape = (3, 4, 5, 6)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    try:
        compile_kernels(compiled_kernels, after_elements=0)
        results = []
        for step in (fused.relu_interval_eager, fused.relu_interval_channels_last):
            center, radius, found = _interval_step(step, shape, dtype, channels_last, grad)
            results.append(found)
        assert center.shape == radius.shape == shape
        assert center.is_contiguous(memory_format=torch.channels_last)
        assert radius.is_contiguous(memory_format=torch.channels_last)
        for eager, found_value in zip(results[0], results[1], strict=True):
            torch.testing.assert_close(found_value, eager, **tol)
    finally:
        compile_kernels(False)
    # Anything but images keeps relu_interval's behaviour.
    center, radius = _interval((5, 13), torch.float32, False)
    with torch.no_grad():
        flat = fused.relu_interval_channels_last(center, radius)
    torch.testing.assert_close(flat[0], fused.relu_interval_eager(center, radius)[0])


def _reference_relaxation(lower: Tensor, upper: Tensor, policy: LowerSlope) -> tuple[Tensor, ...]:
    # The relaxation written out with autograd through guarded `where`s: lower slope, chord,
    # intercept, unstable mask.
    unstable = (lower < 0) & (upper > 0)
    active = (lower >= 0).to(lower.dtype)
    width = torch.where(unstable, upper - lower, torch.ones_like(upper))
    chord = torch.where(unstable, upper / width, active)
    intercept = torch.where(unstable, -chord * lower, torch.zeros_like(upper))
    inner = {
        LowerSlope.ADAPTIVE: (upper >= -lower).to(lower.dtype),
        LowerSlope.ZERO: torch.zeros_like(upper),
        LowerSlope.ONE: torch.ones_like(upper),
        LowerSlope.PARALLEL: chord,
    }[policy]
    return torch.where(unstable, inner, active), chord, intercept, unstable


def _bounds(
    shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool
) -> tuple[Tensor, Tensor]:
    # Random bounds with every kind of neuron, and the edge cases l = u = 0, l = 0 < u,
    # l < u = 0, l = u < 0, l = u > 0, u = -l.
    generator = torch.Generator().manual_seed(sum(shape))
    lower = torch.randn(shape, dtype=dtype, generator=generator)
    upper = lower + 2 * torch.rand(shape, dtype=dtype, generator=generator)
    flat_lower, flat_upper = lower.view(-1), upper.view(-1)
    edges = [(0.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (-1.0, -1.0), (1.0, 1.0), (-0.5, 0.5)]
    for position, (low, high) in enumerate(edges):
        flat_lower[position], flat_upper[position] = low, high
    if channels_last:
        lower = lower.contiguous(memory_format=torch.channels_last)
        upper = upper.contiguous(memory_format=torch.channels_last)
    return lower, upper


RELAXATION_VARIANTS = [
    ((3, 4, 5, 6), torch.float32, True),
    pytest.param((3, 4, 5, 6), torch.float64, False, marks=pytest.mark.slow),
    pytest.param((5, 13), torch.float64, False, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("compiled_kernels", [True, False], ids=["compiled", "eager"])
@pytest.mark.parametrize(("shape", "dtype", "channels_last"), RELAXATION_VARIANTS)
@pytest.mark.parametrize("policy", list(LowerSlope), ids=lambda p: p.value)
def test_relaxation_equals_the_written_out_formula_in_values_gradients_and_layout(
    compiled_kernels: bool, shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool,
    policy: LowerSlope,
) -> None:
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    weights = torch.randn((3, *shape), dtype=dtype, generator=torch.Generator().manual_seed(3))
    try:
        compile_kernels(compiled_kernels, after_elements=0)
        results = []
        for relaxation in (_reference_relaxation, _relaxation_tuple):
            leaves = [t.clone().requires_grad_(True) for t in _bounds(shape, dtype, channels_last)]
            lines = relaxation(*leaves, policy)
            with torch.no_grad():
                no_grad = relaxation(*leaves, policy)
            loss = sum((line * w).sum() for line, w in zip(lines[:3], weights, strict=True))
            assert isinstance(loss, Tensor)
            grads = torch.autograd.grad(loss, leaves)
            results.append((lines, no_grad, grads))
    finally:
        fused._settings.failed = False
        compile_kernels(False)
    (expected, _, expected_grads), (found, found_no_grad, found_grads) = results
    for value, value_no_grad, reference in zip(found, found_no_grad, expected, strict=True):
        # The same arithmetic: equal bits, in the layout of the bounds.
        assert torch.equal(value, reference)
        assert torch.equal(value_no_grad, reference)
        assert value.stride() == reference.stride()
    assert found[3].dtype == torch.bool
    for grad, reference in zip(found_grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, reference, **tol)
    assert all(g.abs().sum() > 0 for g in found_grads), "unstable neurons pass gradients"


def _relaxation_tuple(lower: Tensor, upper: Tensor, policy: LowerSlope) -> tuple[Tensor, ...]:
    relaxation = relu_relaxation(Box(lower, upper), policy)
    return (relaxation.lower_slope, relaxation.upper_slope, relaxation.upper_intercept,
            relaxation.unstable)


@pytest.mark.parametrize("policy", [LowerSlope.ADAPTIVE, LowerSlope.PARALLEL],
                         ids=lambda p: p.value)
def test_relaxation_gradients_match_finite_differences(policy: LowerSlope) -> None:
    # The closed-form derivatives against central differences (bounds away from the kinks at
    # 0 and at u = -l), first and second order.
    generator = torch.Generator().manual_seed(11)
    magnitude = 0.2 + torch.rand((2, 3, 4), dtype=torch.float64, generator=generator)
    sign = torch.randint(0, 3, (2, 3, 4), generator=generator)  # 0: off, 1: unstable, 2: on
    lower = torch.where(sign == 2, magnitude, -magnitude)
    upper = torch.where(sign == 0, -magnitude / 4, lower.abs() * 1.5 + 0.1)
    upper = torch.where(sign == 1, magnitude * 1.7, upper)

    def lines(lower: Tensor, upper: Tensor) -> tuple[Tensor, ...]:
        return _relaxation_tuple(lower, upper, policy)[:3]

    inputs = (lower.requires_grad_(True), upper.requires_grad_(True))
    assert torch.autograd.gradcheck(lines, inputs)
    assert torch.autograd.gradgradcheck(lines, inputs)


@pytest.mark.usefixtures("compiled")
def test_relaxation_gradient_of_one_line_alone_and_of_gradients_in_another_layout() -> None:
    # Only the chord used (no gradient reaches the intercept), and gradients laid out unlike
    # the bounds (copied to their layout before the compiled backward).
    lower, upper = _bounds((2, 3, 4, 5), torch.float32, True)
    weights = torch.randn((2, 3, 4, 5), generator=torch.Generator().manual_seed(1))
    grads = []
    for relaxation in (_reference_relaxation, _relaxation_tuple):
        leaves = [lower.clone().requires_grad_(True), upper.clone().requires_grad_(True)]
        chord = relaxation(*leaves, LowerSlope.ADAPTIVE)[1]
        grads.append(torch.autograd.grad((chord * weights).sum(), leaves))
    for found, expected in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)


def test_relaxation_rejects_an_unknown_policy() -> None:
    lower, upper = _bounds((2, 3), torch.float32, False)
    with pytest.raises(TypeError, match="LowerSlope"):
        relu_relaxation(Box(lower, upper), "adaptive")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="LowerSlope"):
        fused.relu_relaxation(lower, upper, "adaptive")  # type: ignore[arg-type]
