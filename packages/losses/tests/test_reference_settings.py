"""The attacks and boxes of SABR, TAPS and STAPS as their reference code runs them: the step
sizes each PGD takes, step by step, and the small box at the domain's edges."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tightrope.attacks import PGDConfig, multi_estimator_box_pgd, pgd
from tightrope.bounds import Box
from tightrope.losses import SABRConfig, SmallBoxRadius, STAPSConfig, TAPSConfig, small_box


class TowardsTarget(nn.Module):
    """Logits ``[0, -sum (z - target)^2]``: ascending the CE of class 0 (or the violation of
    class 1) moves every coordinate towards ``target`` by a signed step, so the distance
    between consecutive iterates is the step length itself as long as no bound clips it.
    Records every input it sees."""

    def __init__(self, target: Tensor) -> None:
        super().__init__()
        self.target = target
        self.seen: list[Tensor] = []

    def forward(self, z: Tensor) -> Tensor:
        self.seen.append(z.detach().clone())
        target = self.target if z.shape[0] == self.target.shape[0] else self.target.repeat(
            z.shape[0] // self.target.shape[0], 1)
        distance = ((z - target) ** 2).sum(dim=1)
        return torch.stack([torch.zeros_like(distance), -distance], dim=1)


def _step_lengths(iterates: list[Tensor]) -> Tensor:
    """``(steps, N, D)`` absolute moves between consecutive iterates."""
    stacked = torch.stack(iterates)
    return (stacked[1:] - stacked[:-1]).abs()


def _input_pgd_steps(attack_steps: int, config: PGDConfig, eps: float) -> Tensor:
    x = torch.full((4, 3), 0.5, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    model = TowardsTarget(x.clone())
    pgd(model, x, y, eps, config=config, generator=torch.Generator().manual_seed(0))
    # One forward pass per step and one at the last iterate; the ball is never reached, as
    # every step moves towards x and is at most half the radius.
    assert len(model.seen) == attack_steps + 1
    return _step_lengths(model.seen)


def test_sabr_attack_takes_the_reference_steps() -> None:
    # eth-sri/SABR adv_whitebox: step_size 0.5 of the half-width, x0.1 at steps
    # ceil(0.5 n), ceil(0.8 n), ceil(0.9 n) = 4, 7, 8 of n = 8.
    eps = 0.1
    config = SABRConfig().attack
    moves = _input_pgd_steps(8, config, eps)
    expected = eps * torch.tensor([0.5, 0.5, 0.5, 0.5, 0.05, 0.05, 0.05, 0.005],
                                  dtype=torch.float64)
    torch.testing.assert_close(moves, expected.view(8, 1, 1).expand_as(moves),
                               rtol=0, atol=1e-15)
    assert config.random_start
    assert config.steps == 8


def test_staps_attack_takes_the_taps_reference_steps() -> None:
    # eth-sri/TAPS SmallBoxModelWrapper: adv_whitebox(num_steps=10), step_size 0.2, no decay.
    eps = 0.1
    moves = _input_pgd_steps(10, STAPSConfig().attack, eps)
    torch.testing.assert_close(moves, torch.full_like(moves, 0.2 * eps), rtol=0, atol=1e-15)


def test_taps_estimators_take_the_reference_steps() -> None:
    # eth-sri/TAPS _get_pivotal_points_one_batch with 20 steps: lr max(0.2, 2/20) times the
    # box's width, i.e. 0.4 of the half-width, x0.1 after step int(0.7 * 20) = 14.
    lower = torch.tensor([[0.0, 0.2, -1.0]], dtype=torch.float64).repeat(2, 1)
    upper = torch.tensor([[1.0, 0.4, 3.0]], dtype=torch.float64).repeat(2, 1)
    head = TowardsTarget((lower + upper) / 2)
    y = torch.zeros(2, dtype=torch.long)
    multi_estimator_box_pgd(head, lower, upper, y, config=TAPSConfig().estimators,
                            generator=torch.Generator().manual_seed(0))
    # The first call only learns the number of classes; then 20 steps and the last iterate.
    assert len(head.seen) == 1 + 20 + 1
    moves = _step_lengths(head.seen[1:])
    half_width = (upper - lower) / 2
    factors = torch.tensor([0.4] * 14 + [0.04] * 6, dtype=torch.float64)
    expected = factors.view(20, 1, 1) * half_width.unsqueeze(0)
    torch.testing.assert_close(moves, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize(("radius", "tau"), [(SmallBoxRadius.EPS, 0.4 * 0.3),
                                             (SmallBoxRadius.HALF_WIDTH, 0.4 * 0.15)])
def test_small_box_keeps_its_full_width_at_the_domain_edges(radius: SmallBoxRadius,
                                                            tau: float) -> None:
    # A pixel at 0 (and one at 1) with eps 0.3: the clipped eps box is [0, 0.3] ([0.7, 1]).
    # Clamping the centre into the unclipped ball [-0.3 + tau, 0.3 - tau] and clipping to
    # [0, 1] afterwards would cut the box at 0; the references clamp into the clipped box.
    x = torch.tensor([[0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    x_adv = torch.tensor([[0.0, 1.0, 0.3, 0.7]], dtype=torch.float64)
    box = small_box(x, x_adv, 0.3, 0.4, radius=radius)
    width = box.upper - box.lower
    torch.testing.assert_close(width, torch.full_like(width, 2 * tau), rtol=0, atol=1e-15)
    outer = Box.from_linf(x, 0.3)
    assert bool((box.lower >= outer.lower).all())
    assert bool((box.upper <= outer.upper).all())
    expected_lower = torch.tensor([[0.0, 1.0 - 2 * tau, 0.3 - 2 * tau, 0.7]], dtype=torch.float64)
    torch.testing.assert_close(box.lower, expected_lower, rtol=0, atol=1e-15)


def test_small_box_larger_than_the_clipped_box_is_the_clipped_box() -> None:
    # MNIST 0.3 with lambda 0.6: tau = 0.18 > 0.15, half of the clipped width at a 0 pixel.
    x = torch.tensor([[0.0, 0.5]], dtype=torch.float64)
    x_adv = torch.tensor([[0.2, 0.5]], dtype=torch.float64)
    box = small_box(x, x_adv, 0.3, 0.6)
    torch.testing.assert_close(box.lower, torch.tensor([[0.0, 0.32]], dtype=torch.float64))
    torch.testing.assert_close(box.upper, torch.tensor([[0.3, 0.68]], dtype=torch.float64))


def test_small_box_at_shrink_one_is_the_eps_box() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(8, 5, generator=generator, dtype=torch.float64)
    x_adv = torch.rand(8, 5, generator=generator, dtype=torch.float64)
    for radius in SmallBoxRadius:
        box = small_box(x, x_adv, 0.2, 1.0, radius=radius)
        outer = Box.from_linf(x, 0.2)
        assert torch.equal(box.lower, outer.lower)
        assert torch.equal(box.upper, outer.upper)


def test_published_small_box_radii() -> None:
    assert SABRConfig().radius is SmallBoxRadius.EPS
    assert STAPSConfig().radius is SmallBoxRadius.HALF_WIDTH
