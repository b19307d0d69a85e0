"""ibp_trace: the same output as ibp, and pre-activation boxes that contain the true ones."""

from __future__ import annotations

import torch
from torch import nn

from tightrope.bounds import Box, Normalize, ibp, ibp_trace, margin_spec


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        Normalize([0.5], [0.25]),
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 7), nn.ReLU(), nn.Linear(7, 5),
    ).double()
    with torch.no_grad():
        bn = model[2]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_output_equals_ibp_with_and_without_spec() -> None:
    model = _cnn()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    box = Box.from_linf(x, 0.05)
    C = margin_spec(torch.tensor([0, 3, 4]), 5, dtype=torch.float64)
    for spec in (None, C):
        trace, plain = ibp_trace(model, box, spec), ibp(model, box, spec)
        torch.testing.assert_close(trace.output.lower, plain.lower, rtol=0, atol=1e-12)
        torch.testing.assert_close(trace.output.upper, plain.upper, rtol=0, atol=1e-12)


def test_pre_activation_boxes_contain_sampled_relu_inputs() -> None:
    model = _cnn()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    box = Box.from_linf(x, 0.1)
    trace = ibp_trace(model, box)
    relus = [m for m in model if isinstance(m, nn.ReLU)]
    assert len(trace.pre_activations) == len(relus)
    seen: list[torch.Tensor] = []
    handles = [r.register_forward_pre_hook(lambda _m, a: seen.append(a[0])) for r in relus]
    generator = torch.Generator().manual_seed(1)
    try:
        for _ in range(50):
            u = torch.rand(box.shape, dtype=torch.float64, generator=generator)
            seen.clear()
            model(box.lower + u * (box.upper - box.lower))
            for z, bounds in zip(seen, trace.pre_activations, strict=True):
                assert z.shape == bounds.shape
                assert bool(bounds.contains(z, tolerance=1e-9).all())
    finally:
        for handle in handles:
            handle.remove()


def test_gradients_flow_through_pre_activations() -> None:
    model = _cnn()
    box = Box.from_linf(torch.rand(2, 1, 8, 8, dtype=torch.float64), 0.05)
    trace = ibp_trace(model, box)
    sum(b.radius.mean() for b in trace.pre_activations).backward()
    assert model[1].weight.grad is not None
    assert bool(model[1].weight.grad.abs().sum() > 0)


def test_single_channel_images_propagate_in_channels_last_layout_on_cpu() -> None:
    # A contiguous (B, 1, H, W) batch is channels-last in memory but not by its strides;
    # IBP gives it channels-last strides (a view) so that every convolution after it runs in
    # oneDNN's faster layout. Values are those of the plain NCHW computation.
    model = _cnn()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    box = Box.from_linf(x, 0.05)
    trace = ibp_trace(model, box)
    for pre in trace.pre_activations[:2]:
        assert pre.lower.is_contiguous(memory_format=torch.channels_last)
        assert not pre.lower.is_contiguous()
    lower, upper = box.lower, box.upper
    for layer in model:
        if isinstance(layer, nn.ReLU):
            lower, upper = lower.relu(), upper.relu()
            continue
        if isinstance(layer, nn.Flatten):
            lower, upper = layer(lower), layer(upper)
            continue
        if isinstance(layer, nn.Linear | nn.Conv2d):
            weight = layer.weight
            positive, negative = weight.clamp(min=0), weight.clamp(max=0)
            run = (lambda w, z, b: torch.nn.functional.linear(z, w, b)) if isinstance(
                layer, nn.Linear) else (lambda w, z, b, m=layer: torch.nn.functional.conv2d(
                    z, w, b, m.stride, m.padding))
            lower, upper = (run(positive, lower, layer.bias) + run(negative, upper, None),
                            run(positive, upper, layer.bias) + run(negative, lower, None))
            continue
        # Normalize and eval-mode BatchNorm: per-channel affine maps with positive scale here.
        lower, upper = layer(lower), layer(upper)
    torch.testing.assert_close(trace.output.lower, lower, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(trace.output.upper, upper, rtol=1e-9, atol=1e-9)
