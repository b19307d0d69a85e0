"""Gradients of the bounds, checked against finite differences (``gradcheck``, float64).

Certified training back-propagates through the bounds, so they must be differentiable with
respect to the model's weights and biases and to the input box. The bounds are piecewise
smooth (ReLU phases, adaptive slope switches, interval/CROWN intersections, clipping at the
domain); the weights are random with fixed seeds, and every test checks that its point lies
away from the kinks that matter (no pre-activation bound within ``MARGIN`` of 0, several
unstable neurons so the relaxations are exercised).

``torch.func.functional_call`` swaps the parameters for the tensors gradcheck perturbs, so the
bound functions see them as ordinary module parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from tightrope.bounds import (
    Box,
    Intermediate,
    LowerSlope,
    Normalize,
    alpha_crown,
    crown,
    crown_ibp,
    ibp,
    margin_spec,
)

DTYPE = torch.float64
MARGIN = 1e-3

BoundFunction = Callable[[nn.Module, Box, Tensor | None], Box]

METHODS: dict[str, BoundFunction] = {
    "ibp": lambda m, b, C: ibp(m, b, C),
    "crown": lambda m, b, C: crown(m, b, C),
    "crown(ibp)": lambda m, b, C: crown(m, b, C, intermediate=Intermediate.IBP),
    "crown_ibp": lambda m, b, C: crown_ibp(m, b, C),
    "crown(PARALLEL)": lambda m, b, C: crown(m, b, C, lower_slope=LowerSlope.PARALLEL),
    "alpha_crown(steps=0)": lambda m, b, C: alpha_crown(m, b, C, steps=0),
}


def _init(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = model.to(DTYPE)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen, dtype=DTYPE) * 0.8)
    return model.eval()


def mlp(seed: int) -> nn.Module:
    return _init(
        nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)),
        seed,
    )


def cnn(seed: int) -> nn.Module:
    return _init(
        nn.Sequential(
            Normalize([0.5], [0.3]),
            nn.Conv2d(1, 2, 2, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * 3 * 3, 4), nn.ReLU(), nn.Linear(4, 3),
        ),
        seed,
    )


def mlp_batch_norm(seed: int) -> nn.Module:
    model = _init(
        nn.Sequential(
            nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3),
        ),
        seed,
    )
    batch_norm = model[1]
    assert isinstance(batch_norm, nn.BatchNorm1d)
    with torch.no_grad():
        batch_norm.running_var.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed))
    return model


class Bounds(nn.Module):
    """``method(net, box, C)`` as a module, so that ``functional_call`` can swap ``net``'s
    parameters for gradcheck's inputs."""

    def __init__(self, net: nn.Module, method: BoundFunction) -> None:
        super().__init__()
        self.net = net
        self.method = method

    def forward(self, box: Box, C: Tensor | None) -> Tensor:
        bounds = self.method(self.net, box, C)
        return torch.cat([bounds.lower.flatten(), bounds.upper.flatten()])


def check_parameter_gradients(net: nn.Module, method: BoundFunction, box: Box,
                              C: Tensor | None) -> None:
    wrapper = Bounds(net, method)
    names = [f"net.{name}" for name, _ in net.named_parameters()]
    inputs = tuple(p.detach().clone().requires_grad_(True) for p in net.parameters())

    def bound_of(*parameters: Tensor) -> Tensor:
        return functional_call(wrapper, dict(zip(names, parameters, strict=True)), (box, C))

    # The bound must actually depend on the parameters (else gradcheck passes trivially).
    value = bound_of(*inputs)
    gradients = torch.autograd.grad(value.sum(), inputs, allow_unused=True)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in gradients)
    assert torch.autograd.gradcheck(bound_of, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def assert_away_from_kinks(net: nn.Module, box: Box) -> None:
    """Every ReLU pre-activation bound of IBP and CROWN is at least ``MARGIN`` from 0, and
    at least two neurons are unstable."""
    unstable = 0
    prefix: list[nn.Module] = []
    for module in net:
        if isinstance(module, nn.ReLU):
            head = nn.Sequential(*prefix)
            for bounds in (ibp(head, box), crown(head, box)):
                for side in (bounds.lower.detach(), bounds.upper.detach()):
                    assert float(side.abs().min()) > MARGIN, "a bound sits on a ReLU kink"
            bounds = crown(head, box)
            unstable += int(((bounds.lower < 0) & (bounds.upper > 0)).sum())
        prefix.append(module)
    assert unstable >= 2, "too few unstable neurons to exercise the relaxations"


def _box(shape: tuple[int, ...], seed: int, eps: float) -> Box:
    x = 0.2 + 0.6 * torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return Box.from_linf(x, eps)


NETWORKS: dict[str, tuple[Callable[[int], nn.Module], tuple[int, ...], float]] = {
    "mlp": (mlp, (2, 3), 0.15),
    "cnn": (cnn, (2, 1, 4, 4), 0.1),
    "mlp_batch_norm": (mlp_batch_norm, (2, 3), 0.15),
}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_gradients_with_respect_to_parameters(network: str, method: str) -> None:
    build, shape, eps = NETWORKS[network]
    net = build(3)
    box = _box(shape, 3, eps)
    assert_away_from_kinks(net, box)
    C = margin_spec(torch.tensor([0, 2]), 3, dtype=DTYPE) if method != "crown" else None
    check_parameter_gradients(net, METHODS[method], box, C)
    if method == "crown":
        check_parameter_gradients(net, METHODS[method], box, torch.randn(
            2, 2, 3, generator=torch.Generator().manual_seed(4), dtype=DTYPE))


def test_gradients_through_train_mode_batch_norm() -> None:
    # The batch statistics come from the box centres and depend on the earlier weights too.
    net = mlp_batch_norm(5).train()
    box = _box((4, 3), 5, 0.1)
    check_parameter_gradients(net, METHODS["ibp"], box, None)
    check_parameter_gradients(net, METHODS["crown"], box, None)


def test_gradients_through_optimised_alpha_crown() -> None:
    # One Adam step with lr = 2 moves every free slope by about 2 from its start in {0, 1}, so
    # the clamp puts it exactly on 0 or 1: the optimised slopes are locally constant in the
    # weights, the bound is piecewise smooth, and the documented gradient (slopes held fixed)
    # is the true one. The optimisation must actually change the bound for this to test it.
    net = mlp(3)
    box = _box((2, 3), 3, 0.15)
    assert_away_from_kinks(net, box)
    C = margin_spec(torch.tensor([0, 2]), 3, dtype=DTYPE)

    def optimised(m: nn.Module, b: Box, spec: Tensor | None) -> Box:
        return alpha_crown(m, b, spec, steps=1, lr=2.0)

    moved = optimised(net, box, C)
    start = crown(net, box, C)
    assert (moved.lower > start.lower + 1e-6).any() or (moved.upper < start.upper - 1e-6).any()
    check_parameter_gradients(net, optimised, box, C)


def test_alpha_crown_gradient_reaches_every_parameter() -> None:
    net = mlp(3)
    box = _box((2, 3), 3, 0.15)
    bounds = alpha_crown(net, box, margin_spec(torch.tensor([1, 0]), 3), steps=10)
    bounds.lower.sum().backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert bool(parameter.grad.abs().sum() > 0), name


@pytest.mark.parametrize("method", ["ibp", "crown", "crown(ibp)", "alpha_crown(steps=0)"])
def test_gradients_with_respect_to_box_centre_and_radius(method: str) -> None:
    net = cnn(6)
    # Some coordinates are clipped at the domain edge (centre within eps of 0 or 1), none
    # exactly on it.
    x = 0.05 + 0.9 * torch.rand((2, 1, 4, 4), generator=torch.Generator().manual_seed(6),
                                dtype=DTYPE)
    eps = torch.tensor([0.08, 0.12], dtype=DTYPE).view(2, 1, 1, 1)
    assert bool(((x - eps < 0) | (x + eps > 1)).any())
    assert float(torch.minimum((x - eps).abs(), (x + eps - 1).abs()).min()) > MARGIN
    assert_away_from_kinks(net, Box.from_linf(x, eps))
    C = margin_spec(torch.tensor([2, 1]), 3, dtype=DTYPE)
    function = METHODS[method]

    def bound_of(centre: Tensor, radius: Tensor) -> Tensor:
        bounds = function(net, Box.from_linf(centre, radius), C)
        return torch.cat([bounds.lower.flatten(), bounds.upper.flatten()])

    inputs = (x.clone().requires_grad_(True), eps.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(bound_of, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_box_gradients() -> None:
    x = torch.tensor([[0.05, 0.5, 0.97]], dtype=DTYPE, requires_grad=True)
    eps = torch.tensor(0.1, dtype=DTYPE, requires_grad=True)

    def box_of(centre: Tensor, radius: Tensor) -> Tensor:
        box = Box.from_linf(centre, radius)
        return torch.cat([box.lower, box.upper, box.center, box.radius])

    assert torch.autograd.gradcheck(box_of, (x, eps))
