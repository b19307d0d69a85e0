"""The LP and MILP oracles: hand-computed values, every affine layer, shapes, dtypes, failures."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from tightrope.bounds import (
    Box,
    LowerSlope,
    Normalize,
    alpha_crown,
    crown,
    ibp,
    lower,
    lp_bound,
    margin_spec,
    milp_bound,
    milp_fits,
)

scipy_optimize = pytest.importorskip("scipy.optimize")
np = pytest.importorskip("numpy")

F64 = torch.float64


def _init(model: nn.Module, generator: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=generator, dtype=F64)
                    * (2.0 / fan_in) ** 0.5
                )
                assert module.bias is not None
                bias = torch.randn(module.bias.shape, generator=generator, dtype=F64)
                module.bias.copy_(bias * 0.1)
    return model.eval()


def _sample(box: Box, count: int, generator: torch.Generator) -> Tensor:
    """``count`` points of every sample's box, corners included: ``(count, B, *S)``."""
    u = torch.rand((count, *box.shape), generator=generator, dtype=box.lower.dtype)
    corners = torch.rand((count // 4, *box.shape), generator=generator) < 0.5
    u[: count // 4] = corners.to(u.dtype)
    return box.lower + u * (box.upper - box.lower)


def _spec_values(model: nn.Module, points: Tensor, C: Tensor | None) -> Tensor:
    """``C f(x)`` for points ``(N, B, *S)`` -> ``(N, B, K)``."""
    count, batch = points.shape[:2]
    outputs = model(points.flatten(0, 1)).view(count, batch, -1)
    if C is None:
        return outputs
    return torch.einsum("bkn,sbn->sbk", C, outputs)


# --- A hand-computed 2-2-1 network --------------------------------------------------------------
#
# x in [-1, 1]^2,  z1 = x1 + x2 + 1,  z2 = x1 + x2,  f = relu(z1) - relu(z2).
# With s = x1 + x2 in [-2, 2]: z1 in [-1, 3], z2 in [-2, 2] (both unstable; interval arithmetic
# is exact on the first layer, so IBP and CROWN intermediates agree), and the true
# f = relu(s + 1) - relu(s) is 0 for s <= -1, s + 1 on [-1, 0], 1 for s >= 0:  f in [0, 1].
#
# IBP:  relu(z1) in [0, 3], relu(z2) in [0, 2]  ->  f in [0 - 2, 3 - 0] = [-2, 3].
#
# CROWN (adaptive slopes: a = 1 when u >= -l; z1: 3 >= 1 -> a1 = 1; z2: 2 >= 2 -> a2 = 1;
# upper chords: z1: s1 = 3/4, t1 = 3/4;  z2: s2 = 1/2, t2 = 1):
#   lower:  f >= a1 z1 - (s2 z2 + t2) = (s + 1) - (s/2 + 1) = s/2           >= -1.
#   upper:  f <= (s1 z1 + t1) - a2 z2 = 3/4 (s + 1) + 3/4 - s = 3/2 - s/4  <=  2.
#
# LP (triangle relaxation):
#   lower:  min max(0, s + 1) - (s/2 + 1) over s in [-2, 2] (y2 at its chord): on [-2, -1] it is
#           -s/2 - 1 in [-1/2, 0]; on [-1, 2] it is s/2 >= -1/2; minimum -1/2 at s = -1.
#           (alpha-CROWN reaches it: a1 (s + 1) - s/2 - 1 = (a1 - 1/2) s + a1 - 1 has minimum
#           -2 |a1 - 1/2| + a1 - 1, largest at a1 = 1/2: -1/2.)
#   upper:  max 3/4 s + 3/2 - max(0, s): on s <= 0 it grows to 3/2 at s = 0; on s >= 0 it is
#           3/2 - s/4; maximum 3/2 (alpha: a2 = 3/4 gives the same 3/2).
#
# MILP: the true range [0, 1].

HAND = {
    "ibp": (-2.0, 3.0),
    "crown": (-1.0, 2.0),
    "lp": (-0.5, 1.5),
    "milp": (0.0, 1.0),
}


def _hand_network() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).to(F64)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
        model[0].bias.copy_(torch.tensor([1.0, 0.0]))
        model[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
        model[2].bias.zero_()
    return model


def _hand_box() -> Box:
    return Box(-torch.ones(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64))


@pytest.mark.parametrize(
    ("name", "method"),
    [("ibp", ibp), ("crown", crown), ("lp", lp_bound), ("milp", milp_bound)],
)
def test_hand_computed_network(name: str, method: object) -> None:
    bounds = method(_hand_network(), _hand_box())  # type: ignore[operator]
    expected_lower, expected_upper = HAND[name]
    assert bounds.lower.shape == (1, 1)
    assert bounds.lower.item() == pytest.approx(expected_lower, abs=1e-7)
    assert bounds.upper.item() == pytest.approx(expected_upper, abs=1e-7)


def test_hand_computed_alpha_reaches_the_lp() -> None:
    bounds = alpha_crown(_hand_network(), _hand_box(), steps=100)
    assert -1.0 <= bounds.lower.item() <= -0.5 + 1e-9
    assert bounds.lower.item() == pytest.approx(-0.5, abs=1e-3)
    assert 1.5 - 1e-9 <= bounds.upper.item() <= 2.0
    assert bounds.upper.item() == pytest.approx(1.5, abs=1e-2)


def test_hand_computed_specification() -> None:
    # C = [[2], [-1]]: rows 2 f and -f, so [2 * lower, 2 * upper] and [-upper, -lower].
    C = torch.tensor([[2.0], [-1.0]], dtype=F64)
    for method, (low, high) in ((lp_bound, HAND["lp"]), (milp_bound, HAND["milp"])):
        bounds = method(_hand_network(), _hand_box(), C)
        torch.testing.assert_close(bounds.lower, torch.tensor([[2 * low, -high]], dtype=F64),
                                   atol=1e-7, rtol=0)
        torch.testing.assert_close(bounds.upper, torch.tensor([[2 * high, -low]], dtype=F64),
                                   atol=1e-7, rtol=0)


def test_lower_only() -> None:
    bounds = lp_bound(_hand_network(), _hand_box(), upper=False)
    assert bounds.lower.item() == pytest.approx(-0.5, abs=1e-7)
    assert bounds.upper.item() == math.inf
    bounds = milp_bound(_hand_network(), _hand_box(), upper=False)
    assert bounds.lower.item() == pytest.approx(0.0, abs=1e-7)
    assert bounds.upper.item() == math.inf


# --- Every affine layer ---------------------------------------------------------------------------


def _all_layers_network(generator: torch.Generator) -> nn.Sequential:
    model = nn.Sequential(
        Normalize([0.4, 0.5], [0.3, 0.2]),
        nn.Conv2d(2, 3, 3, stride=1, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Sequential(nn.Conv2d(3, 2, 2, stride=1, padding=0), nn.ReLU()),
        nn.Identity(),
        nn.Flatten(),
        nn.Linear(2, 6),
        nn.BatchNorm1d(6),
        nn.Dropout(0.5),
        nn.ReLU(),
        nn.Linear(6, 3),
    ).to(F64)
    _init(model, generator)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(torch.randn(size, generator=generator, dtype=F64) * 0.2)
                module.running_var.copy_(torch.rand(size, generator=generator, dtype=F64) + 0.5)
                module.weight.copy_(torch.randn(size, generator=generator, dtype=F64))
                module.bias.copy_(torch.randn(size, generator=generator, dtype=F64) * 0.1)
    return model.eval()


@pytest.mark.parametrize("training", [False, True])
def test_every_affine_layer_sound_and_ordered(training: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    model = _all_layers_network(generator)
    x = torch.rand((2, 2, 4, 4), generator=generator, dtype=F64)
    box = Box.from_linf(x, 0.05)
    C = margin_spec(torch.tensor([0, 2]), 3, dtype=F64)
    if training:
        # BatchNorm with the batch statistics of the box centres; Dropout stays the identity
        # for bounds, so compare against the eval-mode network with those statistics frozen.
        model.train()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.eval()
    lp, milp = lp_bound(model, box, C), milp_bound(model, box, C)
    base = crown(model, box, C)
    assert torch.all(lp.lower >= base.lower - 1e-6)
    assert torch.all(milp.lower >= lp.lower - 1e-6)
    assert torch.all(lp.upper <= base.upper + 1e-6)
    assert torch.all(milp.upper <= lp.upper + 1e-6)
    if training:
        return  # a forward pass of sampled points would use their own batch statistics
    values = _spec_values(model, _sample(box, 2000, generator), C)
    assert torch.all(values >= milp.lower - 1e-7)
    assert torch.all(values <= milp.upper + 1e-7)
    # The MILP is the exact worst case: the sampled extremes come close to it.
    assert torch.all(values.amin(0) - milp.lower < 0.5 * (milp.upper - milp.lower))


def test_affine_network_is_exact_and_shapes_follow_the_output() -> None:
    # No ReLU: every method is exact, and C=None bounds f with shape (B, *S_out).
    generator = torch.Generator().manual_seed(0)
    model = _init(nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(8, 4)).to(F64),
                  generator)
    box = Box.from_linf(torch.rand((2, 1, 3, 3), generator=generator, dtype=F64), 0.1)
    expected = crown(model, box)
    for method in (lp_bound, milp_bound):
        bounds = method(model, box)
        assert bounds.lower.shape == (2, 4)
        torch.testing.assert_close(bounds.lower, expected.lower, atol=1e-7, rtol=0)
        torch.testing.assert_close(bounds.upper, expected.upper, atol=1e-7, rtol=0)


def test_float32_returns_float32_close_to_float64() -> None:
    generator = torch.Generator().manual_seed(1)
    model64 = _init(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3)).to(F64), generator)
    x = torch.rand((2, 3), generator=generator, dtype=F64)
    C = margin_spec(torch.tensor([0, 2]), 3, dtype=F64)
    model32 = _init(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3)), generator)
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    for method in (lp_bound, milp_bound):
        reference = method(model64, Box.from_linf(x, 0.2), C)
        single = method(model32, Box.from_linf(x.float(), 0.2), C.float())
        assert single.lower.dtype == torch.float32
        torch.testing.assert_close(single.lower.double(), reference.lower, atol=1e-4, rtol=0)
        torch.testing.assert_close(single.upper.double(), reference.upper, atol=1e-4, rtol=0)
    # Parameters of the caller's float32 model are untouched by the float64 conversion.
    assert next(model32.parameters()).dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_box_returns_cuda_bounds() -> None:
    model = _hand_network().cuda()
    box = Box(_hand_box().lower.cuda(), _hand_box().upper.cuda())
    bounds = lp_bound(model, box)
    assert bounds.lower.device.type == "cuda"
    assert bounds.lower.item() == pytest.approx(HAND["lp"][0], abs=1e-7)


def test_lower_slope_policy_only_changes_intermediates() -> None:
    # One hidden layer: intermediates are exact, so the policy cannot change the LP.
    a = lp_bound(_hand_network(), _hand_box(), lower_slope=LowerSlope.ZERO)
    b = lp_bound(_hand_network(), _hand_box(), lower_slope=LowerSlope.ONE)
    torch.testing.assert_close(a.lower, b.lower)


# --- Refusals and failures ----------------------------------------------------------------------


def test_refuses_large_networks() -> None:
    model = nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 2)).to(F64)
    box = Box.from_linf(torch.zeros(1, 10, dtype=F64), 0.1)
    with pytest.raises(ValueError, match="max_variables=100"):
        lp_bound(model, box, max_variables=100)
    # The MILP counts a binary per neuron: 10 + 3 * 50 = 160 > 150 >= 10 + 2 * 50.
    lp_bound(model, box, max_variables=150)
    with pytest.raises(ValueError, match="160 variables"):
        milp_bound(model, box, max_variables=150)
    with pytest.raises(ValueError, match="max_variables must be positive"):
        lp_bound(model, box, max_variables=0)
    net = lower(model, box.lower)
    assert milp_fits(net, max_variables=160)
    assert not milp_fits(net, max_variables=159)
    with pytest.raises(ValueError, match="max_variables must be positive"):
        milp_fits(net, max_variables=0)
    with pytest.raises(ValueError, match="time_limit"):
        milp_bound(model, box, time_limit=0.0)


def test_missing_scipy_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    for method in (lp_bound, milp_bound):
        with pytest.raises(ImportError, match=r"pip install tightrope-bounds\[oracles\]"):
            method(_hand_network(), _hand_box())


def test_package_imports_without_scipy() -> None:
    script = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "scipy" or name.startswith("scipy."):
                    raise ImportError("blocked " + name)
                return None
        sys.meta_path.insert(0, Block())
        import torch
        import tightrope.bounds as tb
        box = tb.Box(torch.zeros(1, 2), torch.ones(1, 2))
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
        tb.crown(model, box)
        try:
            tb.lp_bound(model, box)
        except ImportError as error:
            assert "tightrope-bounds[oracles]" in str(error), error
        else:
            raise SystemExit("lp_bound ran without scipy")
        assert not any(name.startswith("scipy") for name in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def _failed(status: int, **extra: object) -> SimpleNamespace:
    return SimpleNamespace(status=status, message=f"fake status {status}", fun=0.0, **extra)


def test_lp_not_optimal_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scipy_optimize, "linprog", lambda *a, **k: _failed(2))
    with pytest.raises(RuntimeError, match="status 2"):
        lp_bound(_hand_network(), _hand_box())


@pytest.mark.parametrize("status", [2, 3, 4])
def test_milp_failure_raises(monkeypatch: pytest.MonkeyPatch, status: int) -> None:
    monkeypatch.setattr(scipy_optimize, "milp",
                        lambda *a, **k: _failed(status, mip_dual_bound=None))
    with pytest.raises(RuntimeError, match=f"status {status}"):
        milp_bound(_hand_network(), _hand_box())


def test_milp_time_limit_returns_the_dual_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    # Status 1 (time limit): the dual bound of each minimisation, not the incumbent, is used;
    # the hand network's output has no bias, so the bound passes through unchanged.
    monkeypatch.setattr(scipy_optimize, "milp", lambda *a, **k: _failed(1, mip_dual_bound=-5.0))
    bounds = milp_bound(_hand_network(), _hand_box(), time_limit=1.0)
    assert bounds.lower.item() == -5.0
    assert bounds.upper.item() == 5.0
    monkeypatch.setattr(scipy_optimize, "milp",
                        lambda *a, **k: _failed(1, mip_dual_bound=float("nan")))
    bounds = milp_bound(_hand_network(), _hand_box(), time_limit=1.0)
    assert bounds.lower.item() == -math.inf
    assert bounds.upper.item() == math.inf


def test_milp_with_a_real_time_limit_stays_sound() -> None:
    generator = torch.Generator().manual_seed(5)
    model = _init(nn.Sequential(nn.Linear(4, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(),
                                nn.Linear(20, 3)).to(F64), generator)
    x = torch.rand((1, 4), generator=generator, dtype=F64)
    box, C = Box.from_linf(x, 0.3), margin_spec(torch.tensor([1]), 3, dtype=F64)
    limited = milp_bound(model, box, C, time_limit=1e-3)
    exact = milp_bound(model, box, C)
    assert torch.all(limited.lower <= exact.lower + 1e-6)
    assert torch.all(limited.upper >= exact.upper - 1e-6)
    values = _spec_values(model, _sample(box, 1000, generator), C)
    assert torch.all(values >= limited.lower - 1e-7)
    assert torch.all(values >= exact.lower - 1e-7)


# --- The Lagrangian bound behind lp_bound ----------------------------------------------------


def test_lagrangian_bound_is_weak_duality() -> None:
    from tightrope.bounds.lp import lagrangian_bound

    rng = np.random.default_rng(0)
    for _ in range(20):
        n, m_ub, m_eq = 6, 5, 2
        c = rng.normal(size=n)
        A_ub, A_eq = rng.normal(size=(m_ub, n)), rng.normal(size=(m_eq, n))
        point = rng.uniform(-1, 1, size=n)  # makes the program feasible
        b_ub = A_ub @ point + rng.uniform(0, 1, size=m_ub)
        b_eq = A_eq @ point
        lower, upper = -np.ones(n), np.ones(n)
        result = scipy_optimize.linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq,
                                        bounds=np.column_stack([lower, upper]), method="highs")
        assert result.status == 0
        at_optimum = lagrangian_bound(c, A_eq, b_eq, result.eqlin.marginals, A_ub, b_ub,
                                      result.ineqlin.marginals, lower, upper)
        assert at_optimum == pytest.approx(result.fun, abs=1e-9)
        # Any multipliers (inequality ones <= 0) give a valid, usually weaker, bound.
        anything = lagrangian_bound(c, A_eq, b_eq, rng.normal(size=m_eq), A_ub, b_ub,
                                    -rng.uniform(0, 2, size=m_ub), lower, upper)
        assert anything <= result.fun + 1e-12
    with pytest.raises(ValueError, match="<= 0"):
        lagrangian_bound(c, A_eq, b_eq, np.zeros(m_eq), A_ub, b_ub, np.ones(m_ub), lower, upper)
