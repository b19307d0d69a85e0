"""The public API of tightrope.bounds: errors, purity, batching, the layer table, devices."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tightrope.bounds as bounds_package
import tightrope.bounds.linear as linear_module
from tightrope.bounds import (
    Affine,
    Box,
    Intermediate,
    LinearBounds,
    LowerSlope,
    Normalize,
    affine_rule,
    alpha_crown,
    crown,
    crown_ibp,
    ibp,
    linear_bounds,
    lower,
    margin_spec,
    supported_layers,
)

DTYPE = torch.float64

BoxFunction = Callable[..., Box]
BOX_METHODS: dict[str, BoxFunction] = {
    "ibp": ibp,
    "crown": crown,
    "crown_ibp": crown_ibp,
    "alpha_crown": alpha_crown,
}
ALL_METHODS: dict[str, Callable[..., Box | LinearBounds]] = {
    **BOX_METHODS,
    "linear_bounds": linear_bounds,
}


def _seeded(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = model.to(DTYPE)
    with torch.no_grad():
        for tensor in [*model.parameters()]:
            tensor.copy_(torch.randn(tensor.shape, generator=gen, dtype=DTYPE) * 0.7)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                assert module.running_mean is not None
                assert module.running_var is not None
                module.running_mean.copy_(torch.randn(module.num_features, generator=gen,
                                                      dtype=DTYPE))
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=gen,
                                                          dtype=DTYPE))
    return model


def small_cnn(seed: int = 0) -> nn.Module:
    return _seeded(
        nn.Sequential(
            Normalize([0.5, 0.5], [0.3, 0.2]),
            nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
            nn.AvgPool2d(2, stride=1), nn.Dropout(0.3),
            nn.Flatten(), nn.Linear(3 * 2 * 2, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4),
        ),
        seed,
    ).eval()


def small_mlp(seed: int = 0) -> nn.Module:
    return _seeded(
        nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)),
        seed,
    ).eval()


def random_box(shape: tuple[int, ...], seed: int = 0, eps: float = 0.1) -> Box:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return Box.from_linf(x, eps)


def vertices_and_uniform(box: Box, n: int, seed: int) -> Tensor:
    """``(B, n, *S)`` points: half random vertices, half uniform."""
    gen = torch.Generator().manual_seed(seed)
    low, width = box.lower.unsqueeze(1), (box.upper - box.lower).unsqueeze(1)
    shape = (box.shape[0], n // 2, *box.shape[1:])
    corners = (torch.rand(shape, generator=gen, dtype=DTYPE) < 0.5).to(DTYPE)
    uniform = torch.rand(shape, generator=gen, dtype=DTYPE)
    return torch.cat([low + width * corners, low + width * uniform], dim=1)


# --- unsupported models ------------------------------------------------------------------------


class Block(nn.Module):
    """A block whose forward is not piecewise linear: a product of two values."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x) * x


@pytest.mark.parametrize("method", sorted(ALL_METHODS))
def test_unsupported_layers_are_all_named_in_one_type_error(method: str) -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 1, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Sigmoid(),
        nn.Sequential(nn.Flatten(), Block()), nn.ReLU(), nn.Linear(4, 2),
    ).to(DTYPE)
    box = random_box((1, 1, 6, 6))
    with pytest.raises(TypeError) as raised:
        ALL_METHODS[method](model, box)
    message = str(raised.value)
    for expected in ("1 (Tanh", "3 (Sigmoid", "mul", "not linear", "affine_rule"):
        assert expected in message, (expected, message)
    for supported in ("Conv2d", "ReLU", "Linear", "Flatten", "MaxPool2d"):
        assert f"({supported}" not in message


def test_conv_with_unsupported_padding_mode_is_rejected() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")).to(DTYPE)
    with pytest.raises(TypeError, match="padding_mode='reflect'"):
        ibp(model, random_box((1, 1, 4, 4)))


def test_flatten_of_the_batch_dimension_is_rejected() -> None:
    model = nn.Sequential(nn.Flatten(0), nn.Linear(8, 2)).to(DTYPE)
    with pytest.raises(TypeError, match="start_dim"):
        ibp(model, random_box((2, 4)))


class ResidualSequential(nn.Sequential):
    """An ``nn.Sequential`` subclass whose forward is not the chain of its children."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return x + super().forward(x)


class DoubledLinear(nn.Linear):
    """An ``nn.Linear`` subclass whose forward is not ``W x + b``."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * F.linear(x, self.weight, self.bias)


def test_subclass_overriding_forward_is_rejected() -> None:
    model = _seeded(nn.Sequential(DoubledLinear(3, 2)), 1)
    x = torch.rand((1, 3), generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    # Bounding it by the parent's rule would be unsound (it computes something else).
    with pytest.raises(TypeError, match="overrides the forward of"):
        ibp(model, Box.from_linf(x, 0.0))


def test_container_subclass_overriding_forward_is_traced() -> None:
    model = _seeded(nn.Sequential(
        nn.Linear(3, 3), ResidualSequential(nn.ReLU(), nn.Linear(3, 3)), nn.ReLU(),
        nn.Linear(3, 2),
    ), 1)
    x = torch.rand((1, 3), generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    # Its own forward (a residual sum), not the chain of its children, is what gets bounded.
    for method in (ibp, crown):
        bounds = method(model, Box.from_linf(x, 0.0))
        torch.testing.assert_close(bounds.lower, model(x), rtol=1e-12, atol=1e-12)


# --- bad arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(ALL_METHODS))
@pytest.mark.parametrize(
    "shape", [(2, 3, 5), (3, 3, 4), (1, 3, 4), (4,), (2, 1, 3, 4), (3, 5)], ids=str
)
def test_wrong_spec_shape_is_a_value_error(method: str, shape: tuple[int, ...]) -> None:
    # The model has 4 outputs and the box a batch of 2.
    C = torch.ones(shape, dtype=DTYPE)
    with pytest.raises(ValueError, match="C must have shape"):
        ALL_METHODS[method](small_mlp(), random_box((2, 3)), C)


@pytest.mark.parametrize("method", sorted(ALL_METHODS))
def test_dtype_mismatch_between_model_and_box_is_a_type_error(method: str) -> None:
    box = random_box((2, 3))
    with pytest.raises(TypeError, match=r"float32.*float64|\.to\(\)"):
        ALL_METHODS[method](small_mlp().float(), box)
    with pytest.raises(TypeError, match=r"\.to\(\)"):
        ALL_METHODS[method](small_mlp(), Box(box.lower.float(), box.upper.float()))
    # A buffer counts too (BatchNorm's running statistics), and the error names it.
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model = model.to(box.lower.dtype).eval()
    model[1].running_mean = model[1].running_mean.float()
    with pytest.raises(TypeError, match=r"1\.running_mean is torch\.float32"):
        ALL_METHODS[method](model, box)


@pytest.mark.parametrize("method", sorted(ALL_METHODS))
def test_empty_box_is_a_value_error(method: str) -> None:
    box = random_box((2, 3))
    lower = box.lower.clone()
    lower[1, 2] = box.upper[1, 2] + 1e-3
    with pytest.raises(ValueError, match="lower > upper"):
        ALL_METHODS[method](small_mlp(), Box(lower, box.upper))
    upper = box.upper.clone()
    upper[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ALL_METHODS[method](small_mlp(), Box(box.lower, upper))


def test_malformed_boxes() -> None:
    model = small_mlp()
    box = random_box((2, 3))
    with pytest.raises(TypeError, match="Box"):
        ibp(model, (box.lower, box.upper))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch dimension"):
        ibp(model, Box(box.lower[0], box.upper[0]))
    with pytest.raises(TypeError, match="floating point"):
        ibp(model, Box(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)))


@pytest.mark.parametrize("eps", [-0.1, torch.tensor([[0.1], [-1e-6]], dtype=DTYPE)])
def test_negative_eps_is_a_value_error(eps: float | Tensor) -> None:
    with pytest.raises(ValueError, match="eps must be non-negative"):
        Box.from_linf(torch.full((2, 3), 0.5, dtype=DTYPE), eps)


def test_bad_options_are_rejected() -> None:
    model, box = small_mlp(), random_box((2, 3))
    with pytest.raises(ValueError, match="steps"):
        alpha_crown(model, box, steps=-1)
    with pytest.raises(ValueError, match="lr"):
        alpha_crown(model, box, lr=0.0)
    with pytest.raises(TypeError, match="Intermediate"):
        crown(model, box, intermediate="ibp")  # type: ignore[arg-type]


def test_train_mode_batch_norm_needs_a_batch() -> None:
    model = _seeded(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU()), 0).train()
    with pytest.raises(ValueError, match="more than one value per channel"):
        ibp(model, random_box((1, 3)))


def test_train_mode_batch_norm2d_accepts_one_image() -> None:
    # One image still has H x W values per channel, as in torch's own training forward.
    model = _seeded(
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                      nn.Flatten(), nn.Linear(3 * 6 * 6, 4)),
        0,
    ).train()
    box = random_box((1, 2, 6, 6))
    bounds = ibp(model, box)
    with torch.no_grad():
        reference = model(box.center)
    assert bool((bounds.lower <= reference + 1e-9).all())
    assert bool((reference <= bounds.upper + 1e-9).all())


# --- extension point ---------------------------------------------------------------------------


def test_affine_rule_registers_a_new_layer_end_to_end() -> None:
    # The class is made here so that every run registers a type the table has never seen.
    class ChannelScale(nn.Module):
        """``x * factor + shift`` per channel (dimension 1), unknown to the layer table."""

        def __init__(self, channels: int) -> None:
            super().__init__()
            self.factor = nn.Parameter(torch.ones(channels))
            self.shift = nn.Parameter(torch.zeros(channels))

        def forward(self, x: Tensor) -> Tensor:
            view = (1, -1, *([1] * (x.dim() - 2)))
            return x * self.factor.view(view) + self.shift.view(view)

    model = _seeded(
        nn.Sequential(
            nn.Conv2d(1, 3, 3), ChannelScale(3), nn.ReLU(), ChannelScale(3), nn.Flatten(),
            nn.Linear(3 * 2 * 2, 4), nn.ReLU(), nn.Linear(4, 3),
        ),
        2,
    ).eval()
    with torch.no_grad():  # negative factors, so |L| must really be |factor|
        model[1].factor.copy_(torch.tensor([1.5, -0.7, 0.3], dtype=DTYPE))
    box = random_box((2, 1, 4, 4), seed=2, eps=0.2)
    assert ChannelScale not in supported_layers()
    with pytest.raises(TypeError, match="ChannelScale"):
        crown(model, box)

    @affine_rule(ChannelScale)
    def _channel_scale(module: ChannelScale, reference: Tensor) -> Affine:
        def apply_abs(r: Tensor) -> Tensor:
            return r * module.factor.abs().view(1, -1, *([1] * (r.dim() - 2)))

        return Affine(apply=module, apply_abs=apply_abs, name="ChannelScale", mixing=False)

    assert ChannelScale in supported_layers()
    C = margin_spec(torch.tensor([0, 2]), 3, dtype=DTYPE)
    points = vertices_and_uniform(box, 4000, seed=2)
    with torch.no_grad():
        values = torch.einsum("bkn,bmn->bmk", C, model(points.flatten(0, 1)).view(2, 4000, 3))
    for name, method in BOX_METHODS.items():
        result = method(model, box, C)
        assert (values >= result.lower.unsqueeze(1) - 1e-9).all(), name
        assert (values <= result.upper.unsqueeze(1) + 1e-9).all(), name
    # The new layer's parameters receive gradients like any other.
    crown(model, box, C).lower.sum().backward()
    assert model[1].factor.grad is not None
    assert bool(model[1].factor.grad.abs().sum() > 0)


def test_supported_layers_lists_the_layer_table() -> None:
    layers = supported_layers()
    for layer in (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d,
                  nn.AvgPool2d, nn.Identity, nn.Dropout, Normalize, nn.MaxPool2d):
        assert layer in layers, layer
    for layer in (nn.Tanh, nn.Sequential, nn.LeakyReLU, nn.MaxPool1d):
        assert layer not in layers, layer


def test_public_names_are_exported() -> None:
    for name in bounds_package.__all__:
        assert hasattr(bounds_package, name), name
    for name in ("Box", "LinearBounds", "LowerSlope", "Normalize", "affine_rule", "alpha_crown",
                 "crown", "crown_ibp", "ibp", "linear_bounds", "margin_spec", "supported_layers"):
        assert name in bounds_package.__all__, name


# --- purity ------------------------------------------------------------------------------------


def _snapshot(model: nn.Module) -> tuple[dict[str, Tensor], list[bool], list[bool]]:
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    return state, modes, flags


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_bound_functions_do_not_mutate_the_model(train: bool) -> None:
    model = small_cnn().train(train)
    model[-1].weight.requires_grad_(False)  # a frozen layer stays frozen
    before = _snapshot(model)
    box = random_box((3, 2, 6, 6), eps=0.15)
    box_lower, box_upper = box.lower.clone(), box.upper.clone()
    C = margin_spec(torch.tensor([0, 1, 3]), 4, dtype=DTYPE)
    for method in ALL_METHODS.values():
        method(model, box, C)
        method(model, box)
    state, modes, flags = _snapshot(model)
    assert state.keys() == before[0].keys()
    for key, value in state.items():
        assert torch.equal(value, before[0][key]), key  # running stats, num_batches_tracked
    assert modes == before[1]
    assert flags == before[2]
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(box.lower, box_lower)
    assert torch.equal(box.upper, box_upper)


def test_alpha_crown_leaves_no_gradients_and_stays_differentiable() -> None:
    model = small_mlp()
    result = alpha_crown(model, random_box((2, 3), eps=0.3), steps=5)
    assert all(p.grad is None for p in model.parameters())
    assert result.lower.requires_grad


def test_bounds_are_not_cached_on_modules() -> None:
    model = small_mlp()
    box = random_box((2, 3))
    first = crown(model, box)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    second = crown(model, box)
    assert not torch.allclose(first.lower, second.lower)
    fresh = crown(copy.deepcopy(model), box)
    torch.testing.assert_close(second.lower, fresh.lower, rtol=0, atol=0)


def test_no_grad_context_gives_the_same_bounds() -> None:
    model, box = small_cnn(), random_box((2, 2, 6, 6), eps=0.2)
    for name, method in BOX_METHODS.items():
        expected = method(model, box)
        with torch.no_grad():
            got = method(model, box)
        torch.testing.assert_close(got.lower, expected.lower.detach(), msg=name)
        torch.testing.assert_close(got.upper, expected.upper.detach(), msg=name)


def test_alpha_crown_under_inference_mode() -> None:
    model, box = small_mlp(), random_box((2, 3), eps=0.3)
    expected = alpha_crown(model, box, steps=5)
    with torch.inference_mode():
        got = alpha_crown(model, box, steps=5)
    torch.testing.assert_close(got.lower, expected.lower.detach())


def test_other_functions_work_under_inference_mode() -> None:
    model, box = small_mlp(), random_box((2, 3), eps=0.3)
    for name in ("ibp", "crown", "crown_ibp"):
        expected = BOX_METHODS[name](model, box)
        with torch.inference_mode():
            got = BOX_METHODS[name](model, box)
        torch.testing.assert_close(got.lower, expected.lower.detach(), msg=name)


# --- shapes, batching and options ---------------------------------------------------------------


def test_result_shapes_and_dtypes() -> None:
    conv_out = _seeded(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 2)), 3)
    box = random_box((3, 1, 5, 5))
    shared = torch.randn(4, 2 * 2 * 2, dtype=torch.float32)  # cast to the model's dtype
    for name, method in BOX_METHODS.items():
        plain = method(conv_out, box)
        assert plain.shape == (3, 2, 2, 2), name
        assert plain.lower.dtype == DTYPE, name
        specified = method(conv_out, box, shared)
        assert specified.shape == (3, 4), name
        assert specified.upper.shape == (3, 4), name
        assert specified.lower.dtype == DTYPE, name
    linear = linear_bounds(conv_out, box, shared)
    assert linear.lA.shape == (3, 4, 1, 5, 5)
    assert linear.uA.shape == (3, 4, 1, 5, 5)
    assert linear.lb.shape == (3, 4)
    assert linear.ub.shape == (3, 4)


def test_shared_spec_equals_the_expanded_spec() -> None:
    model, box = small_cnn(), random_box((3, 2, 6, 6), eps=0.1)
    shared = torch.randn(2, 4, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    for name, method in BOX_METHODS.items():
        one = method(model, box, shared)
        many = method(model, box, shared.expand(3, 2, 4))
        torch.testing.assert_close(one.lower, many.lower, msg=name)
        torch.testing.assert_close(one.upper, many.upper, msg=name)


def test_crown_defaults_are_crown_intermediates_and_adaptive_slopes() -> None:
    model, box = small_cnn(), random_box((2, 2, 6, 6), eps=0.2)
    default = crown(model, box)
    explicit = crown(model, box, intermediate=Intermediate.CROWN, lower_slope=LowerSlope.ADAPTIVE)
    torch.testing.assert_close(default.lower, explicit.lower, rtol=0, atol=0)
    ibp_intermediates = crown(model, box, intermediate=Intermediate.IBP)
    assert not torch.allclose(default.lower, ibp_intermediates.lower)


@pytest.mark.parametrize("method", sorted(ALL_METHODS))
def test_batched_results_equal_per_sample_results(method: str) -> None:
    model = small_cnn(4)
    x = torch.rand((4, 2, 6, 6), generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    eps = torch.tensor([0.02, 0.1, 0.2, 0.3], dtype=DTYPE).view(4, 1, 1, 1)
    box = Box.from_linf(x, eps)
    C = margin_spec(torch.tensor([3, 0, 1, 2]), 4, dtype=DTYPE)
    function = ALL_METHODS[method]
    batched = function(model, box, C)
    for i in range(4):
        single = function(model, Box(box.lower[i : i + 1], box.upper[i : i + 1]), C[i : i + 1])
        if isinstance(batched, LinearBounds):
            assert isinstance(single, LinearBounds)
            for field in ("lA", "lb", "uA", "ub"):
                torch.testing.assert_close(getattr(batched, field)[i : i + 1],
                                           getattr(single, field), rtol=1e-9, atol=1e-10)
        else:
            assert isinstance(single, Box)
            torch.testing.assert_close(batched.lower[i : i + 1], single.lower, rtol=1e-9,
                                       atol=1e-10)
            torch.testing.assert_close(batched.upper[i : i + 1], single.upper, rtol=1e-9,
                                       atol=1e-10)


def test_row_chunking_of_intermediate_bounds_is_invisible(monkeypatch: pytest.MonkeyPatch) -> None:
    model, box = small_cnn(5), random_box((3, 2, 6, 6), eps=0.3)
    expected = crown(model, box)
    monkeypatch.setattr(linear_module, "ROW_CHUNK_ELEMENTS", 64)
    chunked = crown(model, box)
    torch.testing.assert_close(chunked.lower, expected.lower, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked.upper, expected.upper, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_sample_chunking_of_the_output_pass_is_invisible(
    monkeypatch: pytest.MonkeyPatch, upper: bool, train: bool
) -> None:
    model, box = small_cnn(8).train(train), random_box((5, 2, 6, 6), eps=0.2)
    C = margin_spec(torch.tensor([1, 3, 0, 2, 1]), 4, dtype=DTYPE)
    parameters = list(model.parameters())
    expected = crown(model, box, C, upper=upper)
    expected_grads = torch.autograd.grad(expected.lower.sum(), parameters)
    # Groups of two samples (and one of one at the end).
    net = lower(model, box.center)
    rows = C.shape[1] * (2 if upper else 1)
    widest = max(math.prod(shape) for shape in net.shapes)
    monkeypatch.setattr(linear_module, "OUTPUT_CHUNK_ELEMENTS", 2 * rows * widest)
    assert linear_module._sample_group_size(net, 5, rows, torch.device("cpu")) == 2
    chunked = crown(model, box, C, upper=upper)
    torch.testing.assert_close(chunked.lower, expected.lower, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked.upper, expected.upper, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(chunked.lower.sum(), parameters)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["crown", "crown_ibp", "alpha_crown"])
@pytest.mark.parametrize("with_spec", [False, True], ids=["no_spec", "spec"])
def test_upper_false_gives_infinite_uppers_and_the_same_lowers(method: str,
                                                                with_spec: bool) -> None:
    model, box = small_cnn(6), random_box((2, 2, 6, 6), eps=0.2)
    C = margin_spec(torch.tensor([1, 3]), 4, dtype=DTYPE) if with_spec else None
    function = BOX_METHODS[method]
    both = function(model, box, C)
    lower_only = function(model, box, C, upper=False)
    assert lower_only.shape == both.shape
    assert torch.isposinf(lower_only.upper).all()
    assert torch.isfinite(both.upper).all()
    torch.testing.assert_close(lower_only.lower, both.lower, rtol=1e-9, atol=1e-10)


# --- CUDA --------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestCuda:
    """float32 on the GPU agrees with float64 on the CPU, for eval and train mode."""

    @pytest.mark.parametrize("method", sorted(BOX_METHODS))
    @pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
    def test_float32_cuda_matches_float64_cpu(self, method: str, train: bool) -> None:
        model = small_cnn(7).train(train)
        box = random_box((4, 2, 6, 6), seed=7, eps=0.1)
        C = margin_spec(torch.tensor([0, 1, 2, 3]), 4)
        function = BOX_METHODS[method]
        expected = function(model, box, C)
        gpu_model = copy.deepcopy(model).to(device="cuda", dtype=torch.float32)
        gpu_box = Box(box.lower.to("cuda", torch.float32), box.upper.to("cuda", torch.float32))
        got = function(gpu_model, gpu_box, C.cuda())
        assert got.lower.device.type == "cuda"
        assert got.lower.dtype == torch.float32
        scale = 1e-3 * (1 + expected.lower.abs().max().item())
        torch.testing.assert_close(got.lower.double().cpu(), expected.lower.detach(), rtol=1e-3,
                                   atol=scale)
        torch.testing.assert_close(got.upper.double().cpu(), expected.upper.detach(), rtol=1e-3,
                                   atol=scale)

    def test_cuda_model_with_cpu_box_is_a_type_error(self) -> None:
        model = small_mlp().cuda()
        with pytest.raises(TypeError, match="cuda"):
            ibp(model, random_box((2, 3)))
