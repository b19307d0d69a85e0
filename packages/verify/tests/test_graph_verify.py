"""Verification of graph networks (residual joins, max pooling): the cascade's IBP and CROWN
stages close what they prove, attacks falsify with checked counterexamples, and nothing else
is claimed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from tightrope.bounds import Box, crown, margin_spec
from tightrope.verify import Stage, VerifyStatus, robustness_spec, verify

DTYPE = torch.float64


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)


def residual_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), Residual(3), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    ).to(DTYPE).eval()
    return model


@pytest.mark.parametrize("seed", range(4))
def test_residual_verdicts_are_sound(seed: int) -> None:
    model = residual_net(seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((1, 1, 8, 8), generator=generator, dtype=DTYPE)
    label = int(model(x).argmax())
    decided = set()
    for eps in (0.001, 0.01, 0.3):
        verdict = verify(model, robustness_spec(x, label, eps, 3), timeout=20.0)
        decided.add(verdict.status)
        if verdict.status is VerifyStatus.VERIFIED:
            assert verdict.stage in (Stage.IBP, Stage.CROWN, Stage.ALPHA_CROWN, Stage.BAB,
                                     Stage.MILP)
            points = (x + (torch.rand((4000, 1, 8, 8), generator=generator, dtype=DTYPE) * 2
                           - 1) * eps).clamp(0, 1)
            assert bool((model(points).argmax(dim=1) == label).all())
            if verdict.stage in (Stage.IBP, Stage.CROWN):
                with torch.no_grad():
                    box = Box((x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
                    bound = crown(model, box, margin_spec(torch.tensor([label]), 3))
                assert bool((bound.lower > 0).all())
        elif verdict.status is VerifyStatus.FALSIFIED:
            assert verdict.counterexample is not None
            found = verdict.counterexample.view(1, 1, 8, 8)
            assert float((found - x).abs().max()) <= eps + 1e-12
            assert int(model(found).argmax()) != label
        else:
            assert verdict.status in (VerifyStatus.UNKNOWN, VerifyStatus.TIMEOUT)
    assert VerifyStatus.VERIFIED in decided


def small_graph(seed: int, pool: type[nn.Module]) -> nn.Module:
    """A float32 residual network on 1 x 6 x 6 inputs with a pooling layer."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), Residual(2), pool(2), nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    ).eval()


def _holds_on_samples(model: nn.Module, x: Tensor, label: int, eps: float) -> bool:
    generator = torch.Generator().manual_seed(1)
    points = (x + (torch.rand((20000, *x.shape[1:]), generator=generator) * 2 - 1) * eps)
    with torch.no_grad():
        return bool((model(points.clamp(0, 1)).argmax(dim=1) == label).all())


def test_branch_and_bound_verifies_a_residual_property_crown_cannot() -> None:
    from tightrope.verify import BabConfig, VerifierConfig

    model = small_graph(5, nn.AvgPool2d)
    x = torch.rand((1, 1, 6, 6), generator=torch.Generator().manual_seed(5))
    label, eps = int(model(x).argmax()), 0.3
    box = Box((x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
    with torch.no_grad():
        assert float(crown(model, box, margin_spec(torch.tensor([label]), 3)).lower.min()) < 0
    # The exact MILP optimum of the worst margin is +0.0132 (HiGHS, seen when this test was
    # written): the property holds, and only a search can show it.
    config = VerifierConfig(bab=BabConfig(milp_after=1.0))  # branch-and-bound alone
    verdict = verify(model, robustness_spec(x, label, eps, 3), timeout=120.0, config=config)
    assert verdict.status is VerifyStatus.VERIFIED
    assert verdict.stage is Stage.BAB
    assert verdict.domains > 0
    assert _holds_on_samples(model, x, label, eps)


def test_a_max_pooling_property_left_by_branch_and_bound_goes_to_the_milp() -> None:
    model = small_graph(1, nn.MaxPool2d)
    x = torch.rand((1, 1, 6, 6), generator=torch.Generator().manual_seed(1))
    label, eps = int(model(x).argmax()), 0.1
    # Worst margin +0.058 by the exact MILP; CROWN's bound is -0.044.
    verdict = verify(model, robustness_spec(x, label, eps, 3), timeout=120.0)
    assert verdict.status is VerifyStatus.VERIFIED
    assert verdict.stage is Stage.MILP
    assert _holds_on_samples(model, x, label, eps)


def test_certify_on_a_residual_network_counts_add_up_and_is_sound() -> None:
    from tightrope.verify import certify

    model = residual_net(5)
    generator = torch.Generator().manual_seed(5)
    x = torch.rand((12, 1, 8, 8), generator=generator, dtype=DTYPE)
    y = model(x).argmax(dim=1)
    y[0] = (y[0] + 1) % 3  # one misclassified sample
    result = certify(model, x, y, eps=0.005, timeout_per_sample=5.0)
    counts = result.stage_counts()
    assert sum(counts.values()) == 12
    assert counts.get(Stage.CLEAN, 0) == 1
    assert counts.get(Stage.IBP, 0) + counts.get(Stage.CROWN, 0) >= 8
    for verdict, sample, label in zip(result.verdicts, x, y, strict=True):
        if verdict.status is VerifyStatus.VERIFIED:
            points = (sample + (torch.rand((500, 1, 8, 8), generator=generator, dtype=DTYPE)
                                * 2 - 1) * 0.005).clamp(0, 1)
            assert bool((model(points).argmax(dim=1) == label).all())


RESNET = Path("/work/shared/benchmarks/vnncomp2021/cifar10_resnet")


@pytest.mark.skipif(not RESNET.is_dir(), reason="needs the shared VNN-COMP 2021 benchmarks")
def test_resnet_2b_property_is_verified_by_the_graph_stages() -> None:
    from tightrope.verify import load_onnx
    from tightrope.verify.vnnlib import load_vnnlib

    net = load_onnx(RESNET / "onnx" / "resnet_2b.onnx")
    spec = load_vnnlib(RESNET / "vnnlib_properties_pgd_filtered" / "resnet2b_pgd_filtered"
                       / "prop_2_eps_0.008.vnnlib", net.input_shape,
                       num_outputs=net.num_outputs)
    verdict = verify(net.module.eval(), spec, timeout=60.0)
    assert verdict.status is VerifyStatus.VERIFIED  # VNN-COMP 2021: unsat
    assert verdict.stage in (Stage.CROWN, Stage.ALPHA_CROWN)
