"""Input-space branch-and-bound: never ``VERIFIED`` where a sampled point violates the property.

Random small ReLU networks (2-4 inputs), random polytope specifications (one or two input
boxes, each with one to three unsafe sets of one to three random output constraints, the
offsets placed around the outputs actually reached so that both answers occur). Attacks are
switched off, so the search itself must find the counterexamples. Every ``VERIFIED`` is checked
against thousands of points sampled in the boxes (uniform, plus every corner), every
``FALSIFIED`` by the specification itself.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from tightrope.bounds import Box
from tightrope.verify import (
    BabConfig,
    InputSplit,
    Region,
    Specification,
    Stage,
    UnsafeSet,
    VerifierConfig,
    VerifyStatus,
    verify,
)
from tightrope.verify.input_bab import split_dimension
from tightrope.verify.sound import lowered

DTYPE = torch.float64
SAMPLES = 4000


def input_split_only(**bab: object) -> VerifierConfig:
    return VerifierConfig(attack_restarts=0, strong_attack_restarts=0,
                          bab=BabConfig(batch_size=16, input_split=InputSplit.ALWAYS,
                                        **bab))  # type: ignore[arg-type]


def random_case(seed: int) -> tuple[nn.Module, Specification]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    inputs = 2 + seed % 3
    width = 8 + seed % 9
    outputs = 3
    model = nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width),
                          nn.ReLU(), nn.Linear(width, outputs)).to(DTYPE).eval()
    regions = []
    for _ in range(1 + seed % 2):
        low = torch.rand(1, inputs, generator=generator, dtype=DTYPE) * 2 - 1
        box = Box(low, low + 0.05 + 0.6 * torch.rand(1, inputs, generator=generator,
                                                        dtype=DTYPE))
        with torch.no_grad():
            reached = model(sample(box, 256, generator))
        unsafe = []
        for _ in range(1 + seed % 3):
            rows = 1 + int(torch.randint(3, (1,), generator=generator))
            A = torch.randn(rows, outputs, generator=generator, dtype=DTYPE)
            values = reached @ A.T
            # Offsets near the low end of what the box reaches: sometimes hit, often not.
            quantile = 0.02 * float(torch.rand(1, generator=generator, dtype=DTYPE))
            b = torch.quantile(values, quantile, dim=0) - 0.05 * values.std(dim=0)
            unsafe.append(UnsafeSet(A, b))
        regions.append(Region(box, tuple(unsafe)))
    return model, Specification(tuple(regions))


def sample(box: Box, count: int, generator: torch.Generator) -> torch.Tensor:
    inputs = box.lower.shape[1]
    uniform = torch.rand(count, inputs, generator=generator, dtype=DTYPE)
    corners = torch.tensor(list(itertools.product((0.0, 1.0), repeat=inputs)), dtype=DTYPE)
    unit = torch.cat([uniform, corners])
    return box.lower + unit * (box.upper - box.lower)


def sampled_violation(model: nn.Module, spec: Specification, seed: int) -> bool:
    generator = torch.Generator().manual_seed(10_000 + seed)
    for region in spec.regions:
        points = sample(region.box, SAMPLES, generator)
        with torch.no_grad():
            outputs = model(points)
        if any(bool(u.contains(outputs).any()) for u in region.unsafe):
            return True
    return False


def test_input_splitting_never_verifies_a_sampled_violation() -> None:
    counts = {"verified": 0, "falsified": 0, "bab": 0, "sets": 0}
    for seed in range(40):
        model, spec = random_case(seed)
        verdict = verify(model, spec, timeout=30.0, config=input_split_only())
        assert verdict.status in (VerifyStatus.VERIFIED, VerifyStatus.FALSIFIED), (seed, verdict)
        if verdict.status is VerifyStatus.VERIFIED:
            assert not sampled_violation(model, spec, seed), seed
            counts["verified"] += 1
        else:
            assert verdict.counterexample is not None
            assert verdict.output is not None
            assert spec.violated_by(verdict.counterexample, verdict.output), seed
            counts["falsified"] += 1
        counts["bab"] += verdict.stage is Stage.BAB
        counts["sets"] += max(len(r.unsafe) for r in spec.regions) > 1
    # The sample must exercise both answers, the search itself and disjunctions.
    assert counts["verified"] >= 5, counts
    assert counts["falsified"] >= 5, counts
    assert counts["bab"] >= 5, counts
    assert counts["sets"] >= 10, counts


def test_split_dimension_picks_the_input_the_bound_depends_on() -> None:
    # The output ignores x1 entirely; x1's side is 100 times longer, so "widest side" would
    # pick it, while splitting it cannot change any bound.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(),
                          nn.Linear(6, 1)).to(DTYPE).eval()
    with torch.no_grad():
        model[0].weight[:, 1] = 0.0
    box = Box(torch.tensor([[-1.0, 0.0]], dtype=DTYPE), torch.tensor([[1.0, 200.0]], dtype=DTYPE))
    nets = lowered(model, model, box, rows=1)
    dimension = split_dimension(nets.search, box, torch.ones(1, 1, dtype=DTYPE),
                                torch.zeros(1, dtype=torch.long),
                                torch.zeros(1, 1, 2, dtype=DTYPE))
    assert dimension is not None
    assert int(dimension[0]) == 0


def test_split_dimension_refuses_boxes_without_width() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).to(DTYPE).eval()
    point = torch.zeros(1, 2, dtype=DTYPE)
    box = Box(point, point.clone())
    nets = lowered(model, model, box, rows=1)
    assert split_dimension(nets.search, box, torch.ones(1, 1, dtype=DTYPE),
                           torch.zeros(1, dtype=torch.long),
                           torch.zeros(1, 1, 2, dtype=DTYPE)) is None


@pytest.mark.slow
def test_input_splitting_never_verifies_a_sampled_violation_on_hundreds() -> None:
    for seed in range(1000, 1300):
        model, spec = random_case(seed)
        verdict = verify(model, spec, timeout=60.0, config=input_split_only())
        if verdict.status is VerifyStatus.VERIFIED:
            assert not sampled_violation(model, spec, seed), seed
        elif verdict.status is VerifyStatus.FALSIFIED:
            assert verdict.counterexample is not None
            assert verdict.output is not None
            assert spec.violated_by(verdict.counterexample, verdict.output), seed
