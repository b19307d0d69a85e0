"""relax(): CROWN with caller-chosen lower slopes is CROWN for the policies' slopes and sound
for any slopes in [0, 1]."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tightrope.bounds import Box, Intermediate, LowerSlope, crown, margin_spec, relax


def _net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 3 * 3, 12), nn.ReLU(), nn.Linear(12, 4),
    ).double().eval()


def _problem() -> tuple[nn.Sequential, Box, torch.Tensor]:
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    C = margin_spec(torch.tensor([0, 1, 2, 3]), 4, dtype=torch.float64)
    return _net(), Box.from_linf(x, 0.15), C


@pytest.mark.parametrize("intermediate", list(Intermediate), ids=lambda i: i.value)
@pytest.mark.parametrize("policy", [LowerSlope.ADAPTIVE, LowerSlope.ZERO, LowerSlope.ONE])
def test_default_slopes_give_crown(intermediate: Intermediate, policy: LowerSlope) -> None:
    model, box, C = _problem()
    relaxed = relax(model, box, C, intermediate=intermediate, lower_slope=policy)
    expected = crown(model, box, C, intermediate=intermediate, lower_slope=policy,
                     upper=False).lower
    torch.testing.assert_close(relaxed.lower(), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(relaxed.lower(relaxed.default_slopes), expected, rtol=0, atol=1e-10)


def test_constant_slopes_equal_zero_and_one_policies() -> None:
    model, box, C = _problem()
    relaxed = relax(model, box, C)
    assert any(bool(u.any()) for u in relaxed.unstable), "the test needs unstable neurons"
    for value, policy in ((0.0, LowerSlope.ZERO), (1.0, LowerSlope.ONE)):
        slopes = [torch.full_like(s, value) for s in relaxed.default_slopes]
        expected = crown(model, box, C, intermediate=Intermediate.IBP, lower_slope=policy,
                         upper=False).lower
        torch.testing.assert_close(relaxed.lower(slopes), expected, rtol=0, atol=1e-10)


def test_any_slopes_in_unit_interval_are_sound() -> None:
    model, box, C = _problem()
    relaxed = relax(model, box, C)
    generator = torch.Generator().manual_seed(1)
    samples = box.lower + torch.rand((256, *box.shape), dtype=torch.float64,
                                     generator=generator) * (box.upper - box.lower)
    with torch.no_grad():
        values = torch.einsum("bkn,sbn->sbk", C, model(samples.flatten(0, 1)).view(256, 4, 4))
    for _ in range(10):
        per_row = [torch.rand(s.shape[0], C.shape[1], *s.shape[1:], dtype=torch.float64,
                              generator=generator) for s in relaxed.default_slopes]
        per_neuron = [torch.rand(s.shape, dtype=torch.float64, generator=generator)
                      for s in relaxed.default_slopes]
        for slopes in (per_row, per_neuron):
            lower = relaxed.lower(slopes)
            assert bool((values >= lower.unsqueeze(0) - 1e-9).all())


def test_gradients_reach_slopes_and_parameters() -> None:
    model, box, C = _problem()
    relaxed = relax(model, box, C)
    slopes = [s.clone().requires_grad_(True) for s in relaxed.default_slopes]
    relaxed.lower(slopes).sum().backward()
    assert all(s.grad is not None for s in slopes)
    assert model[0].weight.grad is not None


def test_bad_slopes_are_rejected() -> None:
    model, box, C = _problem()
    relaxed = relax(model, box, C)
    slopes = list(relaxed.default_slopes)
    with pytest.raises(ValueError, match="one per ReLU"):
        relaxed.lower(slopes[:1])
    with pytest.raises(ValueError, match="outside"):
        relaxed.lower([slopes[0] + 2.0, slopes[1]])
    with pytest.raises(ValueError, match="shape"):
        relaxed.lower([slopes[0][:1], slopes[1]])


@pytest.mark.parametrize("with_spec", [True, False])
def test_interval_lower_is_ibp_without_a_second_pass(with_spec: bool) -> None:
    """With IBP intermediates, the interval bound read off the relaxation is ``ibp``'s; with
    CROWN intermediates it is sound and at least as tight."""
    from tightrope.bounds import ibp

    model, box, C = _problem()
    spec = C if with_spec else None
    expected = ibp(model, box, spec).lower.flatten(1)
    torch.testing.assert_close(relax(model, box, spec).interval_lower(), expected,
                               rtol=0, atol=1e-10)
    tighter = relax(model, box, spec, intermediate=Intermediate.CROWN).interval_lower()
    assert bool((tighter >= expected - 1e-10).all())
    # Sound: below the specification at sampled points of the box.
    generator = torch.Generator().manual_seed(5)
    for _ in range(200):
        x = box.lower + (box.upper - box.lower) * torch.rand(box.lower.shape, generator=generator,
                                                             dtype=box.lower.dtype)
        out = model(x)
        values = torch.einsum("bkn,bn->bk", C, out) if with_spec else out
        assert bool((tighter <= values + 1e-10).all())


def test_interval_lower_of_a_network_without_relu() -> None:
    from tightrope.bounds import ibp

    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 4)).double().eval()
    _, box, C = _problem()
    torch.testing.assert_close(relax(model, box, C).interval_lower(), ibp(model, box, C).lower,
                               rtol=0, atol=1e-10)
