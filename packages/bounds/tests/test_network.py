"""Lowering: the layer table, BatchNorm folding and the fast transposes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tightrope.bounds import Normalize
from tightrope.bounds.network import Affine, lower, transpose, transpose_rows

DTYPE = torch.float64


def _randomise_batch_norm(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert module.running_mean is not None
            assert module.running_var is not None
            with torch.no_grad():
                module.running_mean.uniform_(-1, 1, generator=generator)
                module.running_var.uniform_(0.2, 2.0, generator=generator)
                module.weight.uniform_(-2, 2, generator=generator)
                module.bias.uniform_(-1, 1, generator=generator)


CONV_CASES = [
    # (in_channels, out_channels, kernel, stride, padding, dilation, height, width)
    (3, 5, 3, 1, 1, 1, 8, 8),
    (2, 4, 3, 2, 1, 1, 9, 8),
    (1, 6, 5, 2, 2, 1, 28, 28),
    (16, 8, 4, 2, 1, 1, 14, 14),
    (3, 4, 3, 3, 0, 1, 10, 11),
    (2, 3, 3, 1, 2, 2, 7, 7),
    (2, 3, (3, 2), (2, 1), (1, 0), 1, 7, 6),
    (3, 4, 4, 2, 1, 1, 32, 32),
    (1, 2, 2, 2, 0, 1, 9, 9),
    (2, 3, 3, 2, 4, 1, 5, 6),
    (9, 4, 3, 2, 1, 1, 8, 8),
]


SHAPE_CASES = [
    *[
        (nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation), (c_in, height, width))
        for c_in, c_out, kernel, stride, padding, dilation, height, width in CONV_CASES
    ],
    (nn.Linear(6, 4), (6,)),
    (nn.Linear(6, 4), (3, 6)),
    (nn.Flatten(), (2, 3, 4)),
    (nn.Flatten(2), (2, 3, 4)),
    (nn.Flatten(1, 2), (2, 3, 4)),
    (nn.Flatten(-2), (2, 3, 4)),
    (nn.Identity(), (2, 3)),
    (nn.Dropout(), (5,)),
    (nn.BatchNorm1d(5), (5,)),
    (nn.BatchNorm2d(2), (2, 3, 3)),
    (Normalize([0.1, 0.2], [0.5, 2.0]), (2, 3, 3)),
    (nn.AvgPool2d(2), (2, 5, 4)),
]


@pytest.mark.parametrize("case", range(len(SHAPE_CASES)))
def test_declared_output_shapes_match_the_forward_pass(case: int) -> None:
    # Lowering an empty batch takes the shapes the rules declare; a batch of data runs the
    # forward pass: both give the layer's true output shape.
    module, shape = SHAPE_CASES[case]
    module = module.to(DTYPE).eval()
    x = torch.rand(3, *shape, dtype=DTYPE)
    true_shape = tuple(module(x).shape[1:])
    from_data, from_shapes = lower(module, x), lower(module, x[:0])
    assert from_data.shapes == from_shapes.shapes == (shape, true_shape)
    op = from_shapes.ops[0]
    assert isinstance(op, Affine)
    assert op.out_shape in (None, true_shape)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_fast_transpose_matches_vjp(case: tuple) -> None:  # type: ignore[type-arg]
    c_in, c_out, kernel, stride, padding, dilation, height, width = case
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation).to(DTYPE)
    network = lower(nn.Sequential(conv), torch.rand(1, c_in, height, width, dtype=DTYPE))
    op = network.ops[0]
    assert isinstance(op, Affine)
    assert op.fast_transpose is not None
    rows = torch.randn(7, *network.shapes[1], dtype=DTYPE, generator=generator)
    expected = transpose(op.apply, rows, network.shapes[0])
    assert expected.shape == (7, c_in, height, width)
    torch.testing.assert_close(transpose_rows(op, rows, network.shapes[0]), expected)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_concretize_matches_the_transposed_rows(case: tuple) -> None:  # type: ignore[type-arg]
    """A convolution's ``concretize`` rule (strided, few input channels: bounded in phase
    layout) equals Hölder's inequality on its transposed rows."""
    c_in, c_out, kernel, stride, padding, dilation, height, width = case
    generator = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation).to(DTYPE)
    network = lower(nn.Sequential(conv), torch.rand(1, c_in, height, width, dtype=DTYPE))
    op = network.ops[0]
    assert isinstance(op, Affine)
    phased = isinstance(stride, int) and stride > 1 and c_in <= 8 and dilation == 1
    assert (op.concretize is not None) == phased
    if op.concretize is None:
        return
    rows = torch.randn(3, 4, *network.shapes[1], dtype=DTYPE, generator=generator)
    center = torch.randn(3, c_in, height, width, dtype=DTYPE, generator=generator)
    radius = torch.rand(3, c_in, height, width, dtype=DTYPE, generator=generator)
    A = transpose(op.apply, rows.flatten(0, 1), network.shapes[0]).view(3, 4, -1)
    expected = (A @ center.flatten(1).unsqueeze(-1) - A.abs() @ radius.flatten(1).unsqueeze(-1))
    torch.testing.assert_close(op.concretize(rows, center, radius), expected.squeeze(-1))


@pytest.mark.parametrize("with_normalize", [False, True])
def test_input_lower_bound_equals_the_backward_pass_to_the_input(with_normalize: bool) -> None:
    """The output pass's last steps (the box carried through a leading ``Normalize``, a strided
    first convolution bounded in phase layout) give the bound of the plain backward pass to the
    input followed by Hölder's inequality."""
    from tightrope.bounds import Box, margin_spec
    from tightrope.bounds.backward import backward_lower, input_lower_bound
    from tightrope.bounds.core import concretize_lower
    from tightrope.bounds.linear import Intermediate, pre_activation_bounds

    generator = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    layers: list[nn.Module] = [Normalize([0.3, 0.6], [0.2, 0.5])] if with_normalize else []
    model = nn.Sequential(
        *layers, nn.Conv2d(2, 4, 5, 2, 2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 4, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 10),
    ).to(DTYPE).eval()
    _randomise_batch_norm(model, generator)
    x = torch.rand(5, 2, 15, 15, dtype=DTYPE, generator=generator)
    box = Box.from_linf(x, 0.05)
    network = lower(model, x)
    C = margin_spec(torch.arange(5) % 10, 10, dtype=DTYPE)
    pre = pre_activation_bounds(network, box, Intermediate.CROWN)
    found = input_lower_bound(network, len(network.ops), C, box, pre.relaxations)
    A_in, bias = backward_lower(network, len(network.ops), C, pre.relaxations)
    torch.testing.assert_close(found, concretize_lower(A_in, bias, box))


@pytest.mark.parametrize("train", [False, True])
def test_elementwise_fast_transposes_match_vjp(train: bool) -> None:
    generator = torch.Generator().manual_seed(5)
    model = nn.Sequential(Normalize([0.1, 0.2], [0.5, 2.0]), nn.BatchNorm2d(2)).to(DTYPE)
    _randomise_batch_norm(model, generator)
    model.train(train)
    network = lower(model, torch.rand(4, 2, 3, 3, dtype=DTYPE, generator=generator))
    assert len(network.ops) == 2
    for op in network.ops:
        assert isinstance(op, Affine)
        assert op.fast_transpose is not None
        rows = torch.randn(5, 2, 3, 3, dtype=DTYPE, generator=generator)
        torch.testing.assert_close(op.fast_transpose(rows), transpose(op.apply, rows, (2, 3, 3)))


def test_linear_fast_transpose_matches_vjp() -> None:
    generator = torch.Generator().manual_seed(1)
    network = lower(nn.Sequential(nn.Linear(6, 4).to(DTYPE)), torch.rand(1, 6, dtype=DTYPE))
    op = network.ops[0]
    assert isinstance(op, Affine)
    assert op.fast_transpose is not None
    rows = torch.randn(5, 4, dtype=DTYPE, generator=generator)
    torch.testing.assert_close(op.fast_transpose(rows), transpose(op.apply, rows, (6,)))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("out_features", [3, 700])
def test_linear_apply_abs_is_the_absolute_weights(
    out_features: int, grad: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without gradients, 700 rows of 3000 inputs make |W| form in blocks (of 349 rows, then
    # 2); with gradients |W| is formed whole.
    monkeypatch.setattr("tightrope.bounds.network._ABS_BLOCK_ELEMENTS", 3000 * 349)
    generator = torch.Generator().manual_seed(2)
    linear = nn.Linear(3000, out_features).to(DTYPE)
    network = lower(nn.Sequential(linear), torch.rand(1, 3000, dtype=DTYPE))
    op = network.ops[0]
    assert isinstance(op, Affine)
    radius = torch.rand(4, 3000, dtype=DTYPE, generator=generator)
    with torch.set_grad_enabled(grad):
        found = op.apply_abs(radius)
    assert found.requires_grad == grad
    torch.testing.assert_close(found, radius @ linear.weight.detach().abs().T)
    if grad:
        (weight_grad,) = torch.autograd.grad(found.sum(), [linear.weight])
        expected = linear.weight.detach().sign() * radius.sum(dim=0)
        torch.testing.assert_close(weight_grad, expected)


@pytest.mark.parametrize("train", [False, True])
def test_batch_norm_is_folded_and_exact(train: bool) -> None:
    generator = torch.Generator().manual_seed(2)
    model = nn.Sequential(
        Normalize([0.4, 0.5], [0.2, 0.3]),
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 4),
        nn.BatchNorm1d(4),
    ).to(DTYPE)
    _randomise_batch_norm(model, generator)
    model.train(train)
    x = torch.rand(6, 2, 5, 5, dtype=DTYPE, generator=generator)
    network = lower(model, x)
    names = [op.name for op in network.ops]
    # Normalize, Conv+BN, ReLU, Flatten, Linear, BN: BatchNorm2d folded into the convolution;
    # BatchNorm1d stays separate (scaling a Linear layer's outputs is the cheaper side).
    assert len(network.ops) == 6, names
    assert "BatchNorm2d" in names[1]
    assert "BatchNorm1d" in names[5]
    h = x
    for op in network.ops:
        h = op.apply(h) if isinstance(op, Affine) else torch.relu(h)
    with torch.no_grad():
        expected = model(x)  # train mode: BatchNorm uses this batch's statistics
    torch.testing.assert_close(h, expected)
    # |L| r of the folded op equals |scale| * |W| r of the unfolded pair.
    radius = torch.rand(6, 2, 5, 5, dtype=DTYPE, generator=generator)
    conv, norm = model[1], model[2]
    scale = norm.weight / torch.sqrt(
        (conv(model[0](x)).var(dim=(0, 2, 3), unbiased=False) if train else norm.running_var)
        + norm.eps
    )
    folded = network.ops[1]
    assert isinstance(folded, Affine)
    unfolded = nn.functional.conv2d(radius, conv.weight.abs(), None, 1, 1) * scale.abs().view(
        1, -1, 1, 1
    )
    torch.testing.assert_close(folded.apply_abs(radius).detach(), unfolded.detach())


def test_batch_norm_without_previous_weights_is_kept() -> None:
    model = nn.Sequential(nn.BatchNorm2d(2), nn.ReLU(), nn.AvgPool2d(2)).to(DTYPE).eval()
    network = lower(model, torch.rand(1, 2, 4, 4, dtype=DTYPE))
    assert [type(op).__name__ for op in network.ops] == ["Affine", "Relu", "Affine"]
    assert network.shapes == ((2, 4, 4), (2, 4, 4), (2, 4, 4), (2, 2, 2))


TAIL_MODELS = {
    # The trailing affine block starts on flat features.
    "flat": lambda: nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 10),
    ),
    # It starts on channels-last images (Flatten, Linear), read in their memory order.
    "image": lambda: nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 5, 3, padding=1),
        nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 10),
    ),
    # Several affine layers after the last ReLU, BatchNorm with its own shift among them.
    "deep": lambda: nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(3 * 2 * 2, 7), nn.BatchNorm1d(7), nn.Linear(7, 10),
    ),
}


@pytest.mark.parametrize("tail", sorted(TAIL_MODELS))
@pytest.mark.parametrize("classes_used", [1, 3, 10, "skewed"])
def test_ibp_with_shared_specifications_matches_per_sample(
    classes_used: int | str, tail: str
) -> None:
    """IBP applies each distinct margin specification to its group of samples at once; the
    result must equal bounding every sample on its own."""
    from tightrope.bounds import Box, ibp, margin_spec

    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    model = TAIL_MODELS[tail]().to(DTYPE).eval()
    _randomise_batch_norm(model, generator)
    x = torch.rand(24, 1, 8, 8, dtype=DTYPE, generator=generator)
    if classes_used == "skewed":  # one label for most samples: its group spans chunks
        labels = torch.tensor([3] * 17 + [0, 1, 2, 4, 5, 6, 7])
    else:
        labels = torch.randint(0, int(classes_used), (24,), generator=generator)
    box = Box.from_linf(x, 0.05)
    spec = margin_spec(labels, 10, dtype=DTYPE)
    batched = ibp(model, box, spec)
    for i in range(24):
        single = ibp(model, Box(box.lower[i : i + 1], box.upper[i : i + 1]), spec[i : i + 1])
        torch.testing.assert_close(batched.lower[i : i + 1], single.lower)
        torch.testing.assert_close(batched.upper[i : i + 1], single.upper)
    # The parameter gradients agree too (the grouped products are differentiable).
    weights = list(model.parameters())
    grouped = torch.autograd.grad(ibp(model, box, spec).lower.sum(), weights)
    separate = [torch.zeros_like(w) for w in weights]
    for i in range(24):
        single = ibp(model, Box(box.lower[i : i + 1], box.upper[i : i + 1]), spec[i : i + 1])
        for total, part in zip(separate, torch.autograd.grad(single.lower.sum(), weights),
                               strict=True):
            total += part
    for got, expected in zip(grouped, separate, strict=True):
        torch.testing.assert_close(got, expected)
    # Folding C into the last layer is at least as tight as applying C to the output box.
    output = ibp(model, box)
    naive_lower = (spec.clamp(min=0) @ output.lower.unsqueeze(-1)
                   + spec.clamp(max=0) @ output.upper.unsqueeze(-1)).squeeze(-1)
    assert bool((batched.lower >= naive_lower - 1e-12).all())


WINDOW_MODELS = {
    "strided": lambda: nn.Sequential(
        nn.Conv2d(1, 4, 3, 1, 1), nn.ReLU(), nn.Conv2d(4, 5, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(5, 3, 3, 1, 1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4),
    ),
    "dilated_padded": lambda: nn.Sequential(
        Normalize([0.3], [0.2]), nn.Conv2d(1, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, 2, 1), nn.ReLU(), nn.Conv2d(5, 3, 3, 1, 2, dilation=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(3 * 5 * 5, 4),
    ),
    "cnn3_like": lambda: nn.Sequential(
        Normalize([0.5], [0.25]), nn.Conv2d(1, 4, 5, 2, 2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 4, 2, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 3 * 3, 4),
    ),
    "unfolded_batch_norm": lambda: nn.Sequential(
        nn.Conv2d(1, 4, 3, 1, 0), nn.ReLU(), nn.BatchNorm2d(4), nn.Identity(),
        nn.Conv2d(4, 3, 2, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4),
    ),
}


@pytest.mark.parametrize("name", sorted(WINDOW_MODELS))
def test_windowed_intermediate_bounds_equal_dense_ones(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CROWN's intermediate pass over receptive-field windows computes the same bounds as the
    pass over whole images (which the soundness tests also check by sampling)."""
    import tightrope.bounds.linear as linear
    from tightrope.bounds import Box

    torch.manual_seed(7)
    model = WINDOW_MODELS[name]().to(DTYPE)
    _randomise_batch_norm(model, torch.Generator().manual_seed(7))
    model.eval()
    size = 12 if name == "cnn3_like" else (8 if name == "unfolded_batch_norm" else 10)
    x = torch.rand(5, 1, size, size, dtype=DTYPE, generator=torch.Generator().manual_seed(8))
    box = Box.from_linf(x, 0.05)
    network = lower(model, x)
    relus = network.relu_indices
    assert all(linear._windowable(network, i) for i in relus)
    windowed = linear.pre_activation_bounds(network, box)
    monkeypatch.setattr(linear, "_windowable", lambda net, index: False)
    dense = linear.pre_activation_bounds(network, box)
    for index in relus:
        torch.testing.assert_close(windowed.boxes[index].lower, dense.boxes[index].lower)
        torch.testing.assert_close(windowed.boxes[index].upper, dense.boxes[index].upper)
    # The comparison means something only if later layers had unstable neurons to tighten.
    later = windowed.boxes[relus[-1]]
    assert int(((later.lower < 0) & (later.upper > 0)).sum()) > 0
