"""The cascade's answers, stages and error messages, and batched certification.

Hand-made networks make the deciding stage predictable; every FALSIFIED answer must carry a
counterexample that the specification itself rejects, and the per-stage counts of ``certify``
must add up to the number of samples.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tightrope.bounds import Box, ibp, margin_spec
from tightrope.verify import (
    BabConfig,
    Mode,
    Region,
    Specification,
    Stage,
    UnsafeSet,
    VerifierConfig,
    VerifyStatus,
    certify,
    robustness_spec,
    verify,
)

DTYPE = torch.float64


def identity_classifier() -> nn.Sequential:
    """``f(x) = (x_0, x_1)`` through a ReLU (inputs are non-negative): class = larger input."""
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        first.bias.zero_()
        second.weight.copy_(torch.eye(2))
        second.bias.zero_()
    return nn.Sequential(first, nn.ReLU(), second).to(DTYPE).eval()


def test_small_radius_is_verified_by_ibp() -> None:
    model = identity_classifier()
    x = torch.tensor([[0.9, 0.1]], dtype=DTYPE)
    verdict = verify(model, robustness_spec(x, 0, 0.1, 2), timeout=10.0)
    assert verdict.status is VerifyStatus.VERIFIED
    assert verdict.stage is Stage.IBP
    assert verdict.counterexample is None


def test_large_radius_is_falsified_with_a_checked_counterexample() -> None:
    model = identity_classifier()
    x = torch.tensor([[0.6, 0.4]], dtype=DTYPE)
    spec = robustness_spec(x, 0, 0.2, 2)
    verdict = verify(model, spec, timeout=10.0)
    assert verdict.status is VerifyStatus.FALSIFIED
    assert verdict.stage is Stage.ATTACK
    assert verdict.counterexample is not None
    assert verdict.output is not None
    assert spec.violated_by(verdict.counterexample, verdict.output)
    assert verdict.output.dtype == torch.float64


def test_conjunctions_and_several_regions() -> None:
    """Unsafe set {y0 <= 0.5 and y1 >= 0.5}: infeasible on one box, reachable on another."""
    model = identity_classifier()
    unsafe = UnsafeSet(A=torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=DTYPE),
                       b=torch.tensor([0.5, -0.5], dtype=DTYPE))
    safe_box = Box(torch.tensor([[0.6, 0.0]], dtype=DTYPE), torch.tensor([[1.0, 1.0]], dtype=DTYPE))
    bad_box = Box(torch.tensor([[0.0, 0.0]], dtype=DTYPE), torch.tensor([[0.4, 1.0]], dtype=DTYPE))
    holds = Specification((Region(safe_box, (unsafe,)),))
    fails = Specification((Region(safe_box, (unsafe,)), Region(bad_box, (unsafe,))))
    assert verify(model, holds, timeout=10.0).status is VerifyStatus.VERIFIED
    verdict = verify(model, fails, timeout=10.0)
    assert verdict.status is VerifyStatus.FALSIFIED
    assert verdict.counterexample is not None
    assert bool(bad_box.contains(verdict.counterexample).all())


def test_milp_mode_agrees_with_the_cascade() -> None:
    pytest.importorskip("scipy")
    torch.manual_seed(0)
    for trial in range(6):
        model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3)).to(DTYPE).eval()
        x = torch.rand(1, 3, dtype=DTYPE)
        label = int(model(x).argmax())
        spec = robustness_spec(x, label, 0.05 + 0.05 * trial, 3)
        cascade = verify(model, spec, timeout=30.0)
        exact = verify(model, spec, timeout=30.0, config=VerifierConfig(
            mode=Mode.MILP, attack_restarts=0))
        assert cascade.status in (VerifyStatus.VERIFIED, VerifyStatus.FALSIFIED)
        assert exact.status is cascade.status, trial
        if exact.status is VerifyStatus.FALSIFIED:
            assert exact.stage is Stage.MILP
            assert exact.counterexample is not None
            assert exact.output is not None
            assert spec.violated_by(exact.counterexample, exact.output)


def test_bad_arguments_raise() -> None:
    model = identity_classifier()
    spec = robustness_spec(torch.tensor([[0.9, 0.1]], dtype=DTYPE), 0, 0.1, 2)
    with pytest.raises(ValueError, match="timeout"):
        verify(model, spec, timeout=0.0)
    with pytest.raises(TypeError, match="Specification"):
        verify(model, "spec", timeout=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eval"):
        verify(model.train(), spec, timeout=1.0)
    with pytest.raises(ValueError, match="max_domains"):
        BabConfig(batch_size=100, max_domains=10)
    with pytest.raises(ValueError, match="margin"):
        VerifierConfig(margin=-1.0)


def test_certify_counts_add_up_and_beat_ibp() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16),
                          nn.ReLU(), nn.Linear(16, 4)).to(DTYPE).eval()
    x = torch.rand(24, 1, 6, dtype=DTYPE)
    y = model(x).argmax(dim=1)
    y[:3] = (y[:3] + 1) % 4  # three misclassified samples
    eps = 0.03
    events: list[tuple[Stage, int, int]] = []
    result = certify(model, x, y, eps, timeout_per_sample=20.0,
                     progress=lambda *event: events.append(event))
    assert len(result) == 24
    assert sum(result.stage_counts().values()) == 24
    assert sum(result.status_counts().values()) == 24
    assert all(result.verdicts[i].stage is Stage.CLEAN for i in range(3))
    assert events
    assert events[-1][1] == 24
    for i, verdict in enumerate(result.verdicts):
        if verdict.status is VerifyStatus.FALSIFIED:
            spec = robustness_spec(x[i : i + 1], int(y[i]), eps, 4)
            assert verdict.counterexample is not None
            assert verdict.output is not None
            assert spec.violated_by(verdict.counterexample, verdict.output)
    by_ibp = (ibp(model, Box.from_linf(x, eps), margin_spec(y, 4)).lower > 0).all(dim=1)
    assert int(result.verified.sum()) >= int(by_ibp.sum())
    # Complete here: every sample is decided.
    assert int(result.verified.sum()) + int(result.falsified.sum()) == 24


def test_convolutional_nets_agree_with_milp() -> None:
    """Branch-and-bound on convolutions (no attacks) against MILP mode; both exact here."""
    pytest.importorskip("scipy")
    torch.manual_seed(0)
    bab_decided = 0
    for trial in range(5):
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(16, 3),
        ).to(DTYPE).eval()
        x = torch.rand(1, 1, 8, 8, dtype=DTYPE)
        spec = robustness_spec(x, int(model(x).argmax()), 0.08, 3)
        cascade = verify(model, spec, timeout=30.0, config=VerifierConfig(
            attack_restarts=0, strong_attack_restarts=0))
        exact = verify(model, spec, timeout=60.0, config=VerifierConfig(
            mode=Mode.MILP, attack_restarts=0))
        assert cascade.status in (VerifyStatus.VERIFIED, VerifyStatus.FALSIFIED), trial
        assert exact.status is cascade.status, trial
        bab_decided += cascade.stage is Stage.BAB
    assert bab_decided >= 1
