"""Hand-computed bounds on a 2-2-1 network, and the small value types around them.

The network (float64) is

    z = W1 x + b1,  W1 = [[1, 1], [1, -1]],  b1 = [1, 0]
    h = relu(z)
    y = W2 h,       W2 = [[1, -1]]           (no bias)

on the input box x in [-1, 1]^2, i.e. y = relu(x1 + x2 + 1) - relu(x1 - x2).

Pre-activations (exact; the first layer is a single affine map of a box):
    z1 = x1 + x2 + 1 in [-1, 3],   z2 = x1 - x2 in [-2, 2].   Both unstable.

True range of y: the vertices give y(1, 1) = 3, y(1, -1) = 1 - 2 = -1, y(-1, 1) = 1,
y(-1, -1) = 0, and y is piecewise linear, so y in [-1, 3] (checked by a grid below).

IBP: h1 in [0, 3], h2 in [0, 2]  =>  y in [0 - 2, 3 - 0] = [-2, 3].

ReLU relaxation of an unstable neuron (l < 0 < u): upper chord s = u / (u - l), intercept
t = -s l; lower line a z with a in [0, 1].
    neuron 1: l = -1, u = 3: s1 = 3/4, t1 = 3/4
    neuron 2: l = -2, u = 2: s2 = 1/2, t2 = 1
Adaptive lower slopes (a = 1 iff u >= -l): a1 = 1 (3 >= 1), a2 = 1 (2 >= 2, the tie goes to 1).

CROWN lower bound (coefficient +1 on h1 takes its lower line, -1 on h2 takes h2's upper line):
    y >= a1 z1 - (s2 z2 + t2) = (x1 + x2 + 1) - (x1 - x2)/2 - 1 = 0.5 x1 + 1.5 x2
    min over the box = -0.5 - 1.5 = -2.                 lA = [0.5, 1.5],  lb = 0
CROWN upper bound (h1's upper chord, h2's lower line):
    y <= s1 z1 + t1 - a2 z2 = 0.75 (x1 + x2 + 1) + 0.75 - (x1 - x2) = -0.25 x1 + 1.75 x2 + 1.5
    max = 0.25 + 1.75 + 1.5 = 3.5 (looser than IBP's 3).  uA = [-0.25, 1.75], ub = 1.5

Other lower-slope policies, same algebra:
    ZERO (a1 = a2 = 0):     y >= -(x1 - x2)/2 - 1 -> -2;   y <= 0.75 x1 + 0.75 x2 + 1.5 -> 3
    ONE  (a1 = a2 = 1):     same as adaptive here           -> [-2, 3.5]
    PARALLEL (a = s: a1 = 3/4, a2 = 1/2):
        y >= 0.75 z1 - 0.5 z2 - 1 = 0.25 x1 + 1.25 x2 - 0.25  -> -1.75
        y <= 0.75 z1 + 0.75 - 0.5 z2 = 0.25 x1 + 1.25 x2 + 1.5 -> 3

alpha-CROWN (free a1 in the lower bound, free a2 in the upper bound):
    lower: y >= a1 z1 - 0.5 z2 - 1, min = -1.5 - |a1 - 0.5|, best -1.5 at a1 = 1/2;
    upper: y <= (0.75 - a2) x1 + (0.75 + a2) x2 + 1.5, max = 3 for every a2 <= 3/4.
Starting from a1 = a2 = 1, Adam with lr 0.1 moves each slope by 0.1 per step while the gradient
keeps its sign, so 20 steps reach both optima: [-1.5, 3].
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tightrope.bounds import (
    Box,
    Intermediate,
    LowerSlope,
    Normalize,
    alpha_crown,
    crown,
    crown_ibp,
    ibp,
    linear_bounds,
    margin_spec,
)

DTYPE = torch.float64


def hand_network(second_layer: list[list[float]] | None = None) -> nn.Sequential:
    first = nn.Linear(2, 2).to(DTYPE)
    rows = second_layer if second_layer is not None else [[1.0, -1.0]]
    second = nn.Linear(2, len(rows), bias=False).to(DTYPE)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=DTYPE))
        first.bias.copy_(torch.tensor([1.0, 0.0], dtype=DTYPE))
        second.weight.copy_(torch.tensor(rows, dtype=DTYPE))
    return nn.Sequential(first, nn.ReLU(), second).eval()


def unit_box(batch: int = 1) -> Box:
    return Box.from_linf(torch.zeros(batch, 2, dtype=DTYPE), 1.0, domain=None)


def assert_box(bounds: Box, lower: list[list[float]], upper: list[list[float]]) -> None:
    expected_lower = torch.tensor(lower, dtype=DTYPE)
    expected_upper = torch.tensor(upper, dtype=DTYPE)
    torch.testing.assert_close(bounds.lower.detach(), expected_lower, rtol=0, atol=1e-12)
    torch.testing.assert_close(bounds.upper.detach(), expected_upper, rtol=0, atol=1e-12)


def test_true_range_is_inside_every_bound() -> None:
    grid = torch.linspace(-1, 1, 201, dtype=DTYPE)
    points = torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        values = hand_network()(points)
    assert float(values.min()) == pytest.approx(-1.0)
    assert float(values.max()) == pytest.approx(3.0)


def test_ibp() -> None:
    assert_box(ibp(hand_network(), unit_box()), [[-2.0]], [[3.0]])


@pytest.mark.parametrize(
    ("policy", "lower", "upper"),
    [
        (LowerSlope.ADAPTIVE, -2.0, 3.5),
        (LowerSlope.ZERO, -2.0, 3.0),
        (LowerSlope.ONE, -2.0, 3.5),
        (LowerSlope.PARALLEL, -1.75, 3.0),
    ],
)
@pytest.mark.parametrize("intermediate", list(Intermediate), ids=lambda i: i.value)
def test_crown_policies(
    policy: LowerSlope, lower: float, upper: float, intermediate: Intermediate
) -> None:
    # One hidden layer: IBP and CROWN intermediate bounds coincide (exact), so both modes agree.
    bounds = crown(
        hand_network(), unit_box(), intermediate=intermediate, lower_slope=policy
    )
    assert_box(bounds, [[lower]], [[upper]])


def test_crown_default_is_adaptive_and_crown_ibp_agrees() -> None:
    assert_box(crown(hand_network(), unit_box()), [[-2.0]], [[3.5]])
    assert_box(crown_ibp(hand_network(), unit_box()), [[-2.0]], [[3.5]])


def test_linear_bounds_coefficients() -> None:
    linear = linear_bounds(hand_network(), unit_box())
    torch.testing.assert_close(linear.lA.detach(), torch.tensor([[[0.5, 1.5]]], dtype=DTYPE))
    torch.testing.assert_close(linear.lb.detach(), torch.tensor([[0.0]], dtype=DTYPE))
    torch.testing.assert_close(linear.uA.detach(), torch.tensor([[[-0.25, 1.75]]], dtype=DTYPE))
    torch.testing.assert_close(linear.ub.detach(), torch.tensor([[1.5]], dtype=DTYPE))
    assert_box(linear.concretize(unit_box()), [[-2.0]], [[3.5]])


def test_alpha_crown_reaches_the_optimal_slopes() -> None:
    bounds = alpha_crown(hand_network(), unit_box(), steps=20, lr=0.1)
    torch.testing.assert_close(bounds.lower.detach(), torch.tensor([[-1.5]], dtype=DTYPE),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(bounds.upper.detach(), torch.tensor([[3.0]], dtype=DTYPE),
                               rtol=0, atol=1e-6)
    assert_box(alpha_crown(hand_network(), unit_box(), steps=0), [[-2.0]], [[3.5]])


def test_alpha_crown_from_parallel_slopes() -> None:
    # Starting at a1 = 3/4 the lower bound is -1.75; steps of lr = 0.05 reach a1 = 1/2 (bound
    # -1.5) after five steps. The upper bound starts at its optimum 3 (a2 = 1/2 <= 3/4) and
    # must stay there.
    bounds = alpha_crown(hand_network(), unit_box(), lr=0.05, lower_slope=LowerSlope.PARALLEL)
    torch.testing.assert_close(bounds.lower.detach(), torch.tensor([[-1.5]], dtype=DTYPE),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(bounds.upper.detach(), torch.tensor([[3.0]], dtype=DTYPE),
                               rtol=0, atol=1e-12)


# --- a specification folded into the last layer -----------------------------------------------
#
# With W2 = [[1, -1], [1, 1]] the outputs are y1 = h1 - h2 and y2 = h1 + h2, and the margin
# spec of label 0 is C = [[1, -1]]: C y = y1 - y2 = -2 h2 with h2 = relu(x1 - x2) in [0, 2].
# IBP folds C into the last layer, so it bounds -2 h2 directly: [-4, 0] (exact). Applying C to
# the output box instead would give [-2 - 5, 3 - 0] = [-7, 3].
# CROWN: lower -2 h2 >= -2 (s2 z2 + t2) = -(x1 - x2) - 2 -> -4; upper -2 h2 <= -2 a2 z2 with
# a2 = 1 -> -2 (x1 - x2) -> 4. alpha-CROWN drives a2 to 0 for the upper bound: 0.
# Label 1: C = [[-1, 1]], C y = 2 h2: IBP [0, 4]; CROWN [-4, 4]; alpha-CROWN [0, 4].


def test_margin_spec_is_folded_into_the_last_layer() -> None:
    net = hand_network([[1.0, -1.0], [1.0, 1.0]])
    box = unit_box(batch=2)
    C = margin_spec(torch.tensor([0, 1]), 2)
    assert_box(ibp(net, box, C), [[-4.0], [0.0]], [[0.0], [4.0]])
    assert_box(ibp(net, box), [[-2.0, 0.0], [-2.0, 0.0]], [[3.0, 5.0], [3.0, 5.0]])
    assert_box(crown(net, box, C), [[-4.0], [-4.0]], [[4.0], [4.0]])
    alpha = alpha_crown(net, box, C, steps=20)
    torch.testing.assert_close(alpha.lower.detach(), torch.tensor([[-4.0], [0.0]], dtype=DTYPE),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(alpha.upper.detach(), torch.tensor([[0.0], [4.0]], dtype=DTYPE),
                               rtol=0, atol=1e-6)


def test_shared_two_dimensional_spec() -> None:
    net = hand_network([[1.0, -1.0], [1.0, 1.0]])
    C = torch.tensor([[1.0, -1.0], [0.0, 2.0]], dtype=DTYPE)  # -2 h2 and 2 y2 = 2 h1 + 2 h2
    assert_box(ibp(net, unit_box(batch=3), C), [[-4.0, 0.0]] * 3, [[0.0, 10.0]] * 3)


# --- margin_spec -------------------------------------------------------------------------------


def test_margin_spec_rows_and_order() -> None:
    C = margin_spec(torch.tensor([2, 0]), 4, dtype=DTYPE)
    expected = torch.tensor(
        [
            [[-1, 0, 1, 0], [0, -1, 1, 0], [0, 0, 1, -1]],  # y = 2: e2 - e0, e2 - e1, e2 - e3
            [[1, -1, 0, 0], [1, 0, -1, 0], [1, 0, 0, -1]],  # y = 0: e0 - e1, e0 - e2, e0 - e3
        ],
        dtype=DTYPE,
    )
    assert C.dtype == DTYPE
    torch.testing.assert_close(C, expected, rtol=0, atol=0)


def test_margin_spec_default_dtype_and_empty_batch() -> None:
    assert margin_spec(torch.tensor([1]), 3).dtype == torch.get_default_dtype()
    assert margin_spec(torch.zeros(0, dtype=torch.long), 3).shape == (0, 2, 3)


@pytest.mark.parametrize(
    ("y", "num_classes"),
    [
        (torch.tensor([0]), 1),
        (torch.tensor([[0, 1]]), 3),
        (torch.tensor([3]), 3),
        (torch.tensor([-1]), 3),
    ],
)
def test_margin_spec_rejects_bad_arguments(y: torch.Tensor, num_classes: int) -> None:
    with pytest.raises(ValueError, match=r"num_classes|y must|labels"):
        margin_spec(y, num_classes)


# --- Box ---------------------------------------------------------------------------------------


def test_from_linf_clips_to_the_domain() -> None:
    x = torch.tensor([[0.05, 0.5, 0.97]], dtype=DTYPE)
    box = Box.from_linf(x, 0.1)
    torch.testing.assert_close(box.lower, torch.tensor([[0.0, 0.4, 0.87]], dtype=DTYPE))
    torch.testing.assert_close(box.upper, torch.tensor([[0.15, 0.6, 1.0]], dtype=DTYPE))
    torch.testing.assert_close(box.center, torch.tensor([[0.075, 0.5, 0.935]], dtype=DTYPE))
    torch.testing.assert_close(box.radius, torch.tensor([[0.075, 0.1, 0.065]], dtype=DTYPE))
    assert box.shape == (1, 3)


def test_from_linf_without_clip_and_with_another_domain() -> None:
    x = torch.tensor([[0.05, 0.5, 0.97]], dtype=DTYPE)
    free = Box.from_linf(x, 0.1, domain=None)
    torch.testing.assert_close(free.lower, torch.tensor([[-0.05, 0.4, 0.87]], dtype=DTYPE))
    torch.testing.assert_close(free.upper, torch.tensor([[0.15, 0.6, 1.07]], dtype=DTYPE))
    narrow = Box.from_linf(x, 0.1, domain=(0.45, 0.55))
    torch.testing.assert_close(narrow.lower, torch.tensor([[0.45, 0.45, 0.55]], dtype=DTYPE))
    torch.testing.assert_close(narrow.upper, torch.tensor([[0.45, 0.55, 0.55]], dtype=DTYPE))
    with pytest.raises(ValueError, match="domain"):
        Box.from_linf(x, 0.1, domain=(1.0, 0.0))


def test_from_linf_per_sample_radius_and_zero_radius() -> None:
    x = torch.full((2, 1, 2, 2), 0.5, dtype=DTYPE)
    eps = torch.tensor([0.1, 0.6], dtype=DTYPE).view(2, 1, 1, 1)
    box = Box.from_linf(x, eps)
    torch.testing.assert_close(box.lower[:, 0, 0, 0], torch.tensor([0.4, 0.0], dtype=DTYPE))
    torch.testing.assert_close(box.upper[:, 0, 0, 0], torch.tensor([0.6, 1.0], dtype=DTYPE))
    point = Box.from_linf(x, 0.0)
    assert torch.equal(point.lower, x)
    assert torch.equal(point.upper, x)


def test_from_center_radius_contains_and_intersect() -> None:
    box = Box.from_center_radius(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.5]]))
    torch.testing.assert_close(box.lower, torch.tensor([[-1.0, 0.5]]))
    torch.testing.assert_close(box.upper, torch.tensor([[1.0, 1.5]]))
    assert box.contains(torch.tensor([[1.0, 0.5]])).all()
    assert not box.contains(torch.tensor([[1.01, 1.0]])).all()
    assert box.contains(torch.tensor([[1.01, 1.0]]), tolerance=0.02).all()
    other = Box(torch.tensor([[0.5, -3.0]]), torch.tensor([[4.0, 1.0]]))
    both = box.intersect(other)
    torch.testing.assert_close(both.lower, torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(both.upper, torch.tensor([[1.0, 1.0]]))


def test_box_is_frozen_and_checks_shapes() -> None:
    box = unit_box()
    with pytest.raises(AttributeError):
        box.lower = box.upper  # type: ignore[misc]
    with pytest.raises(ValueError, match="one shape"):
        Box(torch.zeros(1, 2), torch.zeros(1, 3))


# --- Normalize ---------------------------------------------------------------------------------


def test_normalize_forward_and_bounds() -> None:
    # Channel 0: (x - 0.5) / 0.5 maps [0, 1] to [-1, 1]; channel 1: (x - 0.25) / 0.25 maps
    # [0, 1] to [-1, 3]. Then y = sum of channel 0 - sum of channel 1 over 2 pixels each:
    # y in [2 * -1 - 2 * 3, 2 * 1 - 2 * -1] = [-8, 4]. Every method is exact (no ReLU).
    normalize = Normalize([0.5, 0.25], [0.5, 0.25]).to(DTYPE)
    x = torch.tensor([[[[0.0, 1.0]], [[0.5, 0.25]]]], dtype=DTYPE)  # (1, 2, 1, 2)
    expected = torch.tensor([[[[-1.0, 1.0]], [[1.0, 0.0]]]], dtype=DTYPE)
    torch.testing.assert_close(normalize(x), expected)
    whole = Box(torch.zeros(1, 2, 1, 2, dtype=DTYPE), torch.ones(1, 2, 1, 2, dtype=DTYPE))
    assert_box(
        ibp(normalize, whole),
        [[[[-1.0, -1.0]], [[-1.0, -1.0]]]],
        [[[[1.0, 1.0]], [[3.0, 3.0]]]],
    )
    linear = nn.Linear(4, 1, bias=False).to(DTYPE)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=DTYPE))
    model = nn.Sequential(normalize, nn.Flatten(), linear)
    for method in (ibp, crown, crown_ibp, alpha_crown):
        assert_box(method(model, whole), [[-8.0]], [[4.0]])


def test_normalize_rejects_bad_statistics() -> None:
    with pytest.raises(ValueError, match="std must be positive"):
        Normalize([0.5], [0.0])
    with pytest.raises(ValueError, match="one value per channel"):
        Normalize([0.5, 0.5], [0.2])
