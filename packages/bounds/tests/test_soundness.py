"""Soundness of every bound function, by sampling.

For random networks built from every supported layer type and random input boxes, no point of
the box may map outside the bounds: ``lower <= C f(x) <= upper``. The sample of each case holds
10^4 points (shared out over the batch): random box vertices, uniform interior points, the
centre, and points pushed towards each bound by a short sign-gradient attack (uniform points
alone rarely come close to a bound in more than a few dimensions).

Besides soundness, the guaranteed relations between the methods are checked (and nothing
stronger: CROWN is not always tighter than IBP):

* ``alpha_crown(steps=0) == crown`` and ``alpha_crown`` is never looser than ``crown`` with the
  same intermediate bounds and starting slopes;
* ``crown_ibp == crown(intermediate=Intermediate.IBP)``;
* ``linear_bounds(...).concretize(box) == crown(...)`` and the linear functions bound
  ``C f(x)`` pointwise.

Train-mode BatchNorm uses the batch statistics of the clean forward pass of the box centres
(``network.py``): the reference function here is the network with every such BatchNorm frozen
to the statistics of the centre batch at that layer, written independently with
``F.batch_norm`` and checked against a real train-mode forward on the centres.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tightrope.bounds import (
    Box,
    Intermediate,
    LinearBounds,
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
#: Sampled points per case, shared out over the batch.
POINTS_PER_CASE = 10_000
ATTACK_STEPS = 12


def tolerance(reference: Tensor) -> Tensor:
    """Round-off allowance: float64 bounds are computed in a different order than f."""
    return 1e-9 * (1.0 + reference.abs())


# --- random networks ---------------------------------------------------------------------------


def _randomise(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random weights, and random running statistics and affine parameters for BatchNorm
    (negative scales included, so ``|L|`` matters)."""
    model = model.to(DTYPE)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=gen, dtype=DTYPE)
                    * (1.5 / fan_in**0.5)
                )
                if module.bias is not None:
                    module.bias.copy_(
                        0.3 * torch.randn(module.bias.shape, generator=gen, dtype=DTYPE)
                    )
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                if module.running_mean is not None and module.running_var is not None:
                    module.running_mean.copy_(0.5 * torch.randn(n, generator=gen, dtype=DTYPE))
                    module.running_var.copy_(
                        0.2 + 2 * torch.rand(n, generator=gen, dtype=DTYPE)
                    )
                if module.weight is not None and module.bias is not None:
                    module.weight.copy_(torch.randn(n, generator=gen, dtype=DTYPE))
                    module.bias.copy_(0.3 * torch.randn(n, generator=gen, dtype=DTYPE))
    return model


def _mlp(gen: torch.Generator) -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(
        nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 4)
    ), (5,)


def _deep_mlp(gen: torch.Generator) -> tuple[nn.Module, tuple[int, ...]]:
    # Narrow and deep: intermediate CROWN bounds go through several relaxed layers.
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(6, 6)]
    for _ in range(4):
        layers += [nn.ReLU(), nn.Linear(6, 6)]
    layers += [nn.ReLU(), nn.Linear(6, 3)]
    return nn.Sequential(*layers), (2, 3)


def _mlp_bn(gen: torch.Generator) -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(8, 6), nn.BatchNorm1d(6, affine=False), nn.ReLU(), nn.Linear(6, 3),
    ), (4,)


def _nested(gen: torch.Generator) -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(
        nn.Sequential(nn.Linear(4, 6), nn.Identity(), nn.ReLU()),
        nn.Identity(),
        nn.Sequential(nn.Sequential(nn.Linear(6, 6, bias=False)), nn.ReLU(), nn.Dropout(0.5)),
        nn.Sequential(nn.Linear(6, 5), nn.ReLU()),  # ends in a ReLU
    ), (4,)


def _relu_first(gen: torch.Generator) -> tuple[nn.Module, tuple[int, ...]]:
    # Normalize makes the inputs of the leading ReLU change sign; consecutive ReLUs; a ReLU at
    # the end.
    return nn.Sequential(
        Normalize([0.5, 0.4, 0.6, 0.5], [0.2, 0.3, 0.25, 0.2]), nn.ReLU(), nn.Linear(4, 6),
        nn.ReLU(), nn.ReLU(), nn.Linear(6, 3), nn.ReLU(),
    ), (4,)


def _affine_only(gen: torch.Generator) -> tuple[nn.Module, tuple[int, ...]]:
    # No ReLU: every method must be exact up to the relaxation-free interval/Hölder step.
    return nn.Sequential(
        Normalize([0.4, 0.6], [0.3, 0.2]), nn.Flatten(), nn.Linear(2 * 3 * 3, 5), nn.Identity()
    ), (2, 3, 3)


def _cnn_strided(gen: torch.Generator) -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(
        Normalize([0.5, 0.4, 0.3], [0.25, 0.3, 0.2]),
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=1, padding=0), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 8), nn.ReLU(), nn.Linear(8, 5),
    ), (3, 8, 8)


def _cnn_bn_pool(gen: torch.Generator) -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=1, padding=2), nn.BatchNorm2d(3), nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0)), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 4),
    ), (2, 5, 5)


def _cnn_pool_first(gen: torch.Generator) -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(
        nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False),
        nn.Conv2d(1, 3, 2, stride=2, bias=False), nn.ReLU(), nn.Dropout(0.2),
        nn.AvgPool2d(kernel_size=(1, 2), stride=1), nn.Flatten(), nn.Linear(3 * 3 * 2, 6),
        nn.ReLU(), nn.Linear(6, 4),
    ), (1, 6, 6)


def _cnn_bn_first(gen: torch.Generator) -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(
        nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
        nn.Sequential(nn.Conv2d(3, 2, 2, stride=2), nn.ReLU()),
        nn.Flatten(1), nn.Linear(2 * 2 * 2, 3),
    ), (2, 4, 4)


def _cnn_conv_out(gen: torch.Generator) -> tuple[nn.Module, tuple[int, ...]]:
    # The output is a feature map: bounds of shape (B, 2, 2, 2) without C, n_out = 8 with C.
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=1, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2)
    ), (1, 4, 4)


Builder = Callable[[torch.Generator], tuple[nn.Module, tuple[int, ...]]]

EVAL_ARCHITECTURES: dict[str, Builder] = {
    "mlp": _mlp,
    "deep_mlp": _deep_mlp,
    "mlp_bn": _mlp_bn,
    "nested": _nested,
    "relu_first": _relu_first,
    "affine_only": _affine_only,
    "cnn_strided": _cnn_strided,
    "cnn_bn_pool": _cnn_bn_pool,
    "cnn_pool_first": _cnn_pool_first,
    "cnn_bn_first": _cnn_bn_first,
    "cnn_conv_out": _cnn_conv_out,
}
#: Architectures with BatchNorm, bounded in train mode (batch statistics of the box centres).
TRAIN_ARCHITECTURES: dict[str, Builder] = {
    "mlp_bn": _mlp_bn,
    "cnn_bn_pool": _cnn_bn_pool,
    "cnn_bn_first": _cnn_bn_first,
}


def build(builder: Builder, seed: int, train: bool) -> tuple[nn.Module, tuple[int, ...]]:
    gen = torch.Generator().manual_seed(seed)
    model, input_shape = builder(gen)
    model = _randomise(model, gen)
    model.train(train)
    return model, input_shape


# --- reference function ------------------------------------------------------------------------


def _leaves(module: nn.Module) -> Iterator[nn.Module]:
    if isinstance(module, nn.Sequential):
        for child in module:
            yield from _leaves(child)
    else:
        yield module


def _uses_batch_stats(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or module.running_mean is None
    )


def reference_forward(model: nn.Module, centers: Tensor, points: Tensor) -> Tensor:
    """``f(points)`` with every batch-statistics BatchNorm frozen to the statistics that the
    clean forward pass of ``centers`` (the whole batch) has at that layer; Dropout is the
    identity. In eval mode this is ``model(points)``."""
    if not any(_uses_batch_stats(m) for m in _leaves(model)) and not model.training:
        return model(points)
    clean, z = centers, points
    for module in _leaves(model):
        if _uses_batch_stats(module):
            assert isinstance(module, nn.modules.batchnorm._BatchNorm)
            dims = [0, *range(2, clean.dim())]
            mean = clean.mean(dim=dims).detach()
            var = clean.var(dim=dims, unbiased=False).detach()
            clean, z = (
                F.batch_norm(t, mean, var, module.weight, module.bias, False, 0.0, module.eps)
                for t in (clean, z)
            )
        elif isinstance(module, nn.Dropout):
            continue
        else:
            clean, z = module(clean), module(z)
    return z


def _dropout_off(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    return twin


# --- boxes, specifications and samples ---------------------------------------------------------


def random_box(gen: torch.Generator, batch: int, input_shape: tuple[int, ...]) -> Box:
    """A box around random centres, clipped at [0, 1], with some zero-width coordinates and,
    for some samples, a per-sample radius."""
    x = torch.rand((batch, *input_shape), generator=gen, dtype=DTYPE)
    # Push some centres onto and past the domain edges so clipping is one-sided or total.
    edge = torch.rand(x.shape, generator=gen, dtype=DTYPE)
    x = torch.where(edge < 0.1, torch.zeros_like(x), x)
    x = torch.where(edge > 0.9, torch.ones_like(x), x)
    eps = 0.02 + 0.3 * torch.rand((batch, *([1] * len(input_shape))), generator=gen, dtype=DTYPE)
    box = Box.from_linf(x, eps)
    flat = torch.rand(x.shape, generator=gen, dtype=DTYPE) < 0.2
    point = box.center
    return Box(torch.where(flat, point, box.lower), torch.where(flat, point, box.upper))


SPECS = ("none", "margin", "random", "shared")


def random_spec(kind: str, gen: torch.Generator, batch: int, n_out: int) -> Tensor | None:
    if kind == "none":
        return None
    if kind == "margin":
        y = torch.randint(0, n_out, (batch,), generator=gen)
        return margin_spec(y, n_out, dtype=DTYPE)
    if kind == "random":
        return torch.randn((batch, 3, n_out), generator=gen, dtype=DTYPE)
    if kind == "shared":
        return torch.randn((2, n_out), generator=gen, dtype=DTYPE)
    raise AssertionError(kind)


@dataclass(frozen=True)
class Case:
    model: nn.Module
    box: Box
    C: Tensor | None

    def outputs(self, points: Tensor) -> Tensor:
        """``C f(x)`` (or ``f(x)``) for ``points: (B, N, *S_in)`` -> ``(B, N, *S_out_or_K)``."""
        batch, n = points.shape[:2]
        out = reference_forward(self.model, self.box.center, points.flatten(0, 1))
        out = out.view(batch, n, *out.shape[1:])
        if self.C is None:
            return out
        C = self.C if self.C.dim() == 3 else self.C.expand(batch, *self.C.shape)
        return torch.einsum("bkn,bmn->bmk", C, out.flatten(2))


def _project(points: Tensor, box: Box) -> Tensor:
    return torch.maximum(torch.minimum(points, box.upper.unsqueeze(1)), box.lower.unsqueeze(1))


def sample_points(case: Case, gen: torch.Generator, total: int = POINTS_PER_CASE) -> Tensor:
    """``(B, total // B, *S_in)`` points of the box: vertices, uniform points, the centre, and
    the end points of a sign-gradient attack on every output coordinate in both directions."""
    box = case.box
    batch, shape = box.shape[0], tuple(box.shape[1:])
    n = total // batch
    low, width = box.lower.unsqueeze(1), (box.upper - box.lower).unsqueeze(1)
    with torch.no_grad():
        probe = case.outputs(box.center.unsqueeze(1))
    rows = probe[:, 0].flatten(1).shape[1]
    n_attack = 2 * rows
    n_vertices = (n - n_attack - 1) // 2
    n_uniform = n - n_attack - 1 - n_vertices
    corner = torch.rand((batch, n_vertices, *shape), generator=gen, dtype=DTYPE) < 0.5
    vertices = low + width * corner.to(DTYPE)
    uniform = low + width * torch.rand((batch, n_uniform, *shape), generator=gen, dtype=DTYPE)
    start = low + width * (
        torch.rand((batch, n_attack, *shape), generator=gen, dtype=DTYPE) < 0.5
    ).to(DTYPE)
    attacked = _attack(case, start, rows)
    return torch.cat([box.center.unsqueeze(1), vertices, uniform, attacked], dim=1)


def _attack(case: Case, start: Tensor, rows: int) -> Tensor:
    """Point ``2k`` maximises and point ``2k + 1`` minimises output coordinate ``k``."""
    direction = torch.zeros((start.shape[0], 2 * rows, rows), dtype=DTYPE)
    index = torch.arange(rows)
    direction[:, 2 * index, index] = 1.0
    direction[:, 2 * index + 1, index] = -1.0
    width = (case.box.upper - case.box.lower).unsqueeze(1)
    points = start
    for step in range(ATTACK_STEPS):
        points = points.detach().requires_grad_(True)
        objective = (case.outputs(points).flatten(2) * direction).sum()
        (gradient,) = torch.autograd.grad(objective, points)
        size = 0.5 * 0.7**step
        points = _project(points + size * width * gradient.sign(), case.box)
    return points.detach()


# --- assertions ---------------------------------------------------------------------------------


def assert_inside(name: str, values: Tensor, bounds: Box) -> None:
    """``values: (B, N, *S)`` against ``bounds: (B, *S)``."""
    assert bounds.lower.shape == values[:, 0].shape, f"{name}: bound shape {bounds.shape}"
    lower, upper = bounds.lower.unsqueeze(1), bounds.upper.unsqueeze(1)
    below = (lower - values - tolerance(values)).max()
    above = (values - upper - tolerance(values)).max()
    assert not torch.isnan(bounds.lower).any(), name
    assert not torch.isnan(bounds.upper).any(), name
    assert below <= 0, f"{name}: a point lies {float(below):.3e} below the lower bound"
    assert above <= 0, f"{name}: a point lies {float(above):.3e} above the upper bound"


def assert_close(name: str, actual: Box, expected: Box, atol: float = 1e-10) -> None:
    torch.testing.assert_close(actual.lower, expected.lower, rtol=1e-9, atol=atol, msg=name)
    torch.testing.assert_close(actual.upper, expected.upper, rtol=1e-9, atol=atol, msg=name)


def assert_not_looser(name: str, tight: Box, loose: Box) -> None:
    slack = 1e-9 * (1 + loose.lower.abs())
    assert (tight.lower >= loose.lower - slack).all(), f"{name}: lower looser"
    slack = 1e-9 * (1 + loose.upper.abs())
    assert (tight.upper <= loose.upper + slack).all(), f"{name}: upper looser"


def check_case(
    case: Case, gen: torch.Generator, alpha_steps: int = 5, thorough: bool = False
) -> None:
    """Soundness of every method on ``case`` and the guaranteed relations between them;
    ``thorough`` adds the lower-slope policies under IBP intermediates and alpha-CROWN started
    from the ZERO policy."""
    model, box, C = case.model, case.box, case.C
    values = case.outputs(sample_points(case, gen)).detach()

    results: dict[str, Box] = {
        "ibp": ibp(model, box, C),
        "crown_ibp": crown_ibp(model, box, C),
        "alpha_crown": alpha_crown(model, box, C, steps=alpha_steps),
        "alpha_crown(ibp)": alpha_crown(model, box, C, steps=alpha_steps,
                                        intermediate=Intermediate.IBP),
    }
    for policy in LowerSlope:
        for intermediate in Intermediate:
            ibp_variant = intermediate is Intermediate.IBP and policy is not LowerSlope.ADAPTIVE
            if ibp_variant and not thorough:
                continue
            results[f"crown({intermediate.value}, {policy.name})"] = crown(
                model, box, C, intermediate=intermediate, lower_slope=policy
            )
    if thorough:
        results["alpha_crown(ZERO start)"] = alpha_crown(
            model, box, C, steps=alpha_steps, lower_slope=LowerSlope.ZERO
        )
        assert_not_looser(
            "alpha(ZERO start) >= crown(ZERO)",
            results["alpha_crown(ZERO start)"],
            results["crown(crown, ZERO)"],
        )
    for name, bounds in results.items():
        assert_inside(name, values, bounds)

    crown_box = results["crown(crown, ADAPTIVE)"]
    assert_close("crown_ibp == crown(ibp)", results["crown_ibp"], results["crown(ibp, ADAPTIVE)"])
    assert_close("alpha steps=0 == crown", alpha_crown(model, box, C, steps=0), crown_box)
    assert_close(
        "alpha(ibp) steps=0 == crown_ibp",
        alpha_crown(model, box, C, steps=0, intermediate=Intermediate.IBP),
        results["crown_ibp"],
    )
    assert_not_looser("alpha >= crown", results["alpha_crown"], crown_box)
    assert_not_looser("alpha(ibp) >= crown_ibp", results["alpha_crown(ibp)"], results["crown_ibp"])

    for intermediate in Intermediate:
        linear = linear_bounds(model, box, C, intermediate=intermediate)
        name = f"crown({intermediate.value}, ADAPTIVE)"
        assert_close(
            f"linear_bounds({intermediate.value}).concretize == crown",
            _reshape_like(linear.concretize(box), results[name]),
            results[name],
        )
        assert_linear_bounds_hold(linear, sample_points(case, gen, total=2000), case)


def _reshape_like(bounds: Box, like: Box) -> Box:
    return Box(bounds.lower.view(like.shape), bounds.upper.view(like.shape))


def assert_linear_bounds_hold(linear: LinearBounds, points: Tensor, case: Case) -> None:
    lA, lb, uA, ub = (getattr(linear, name).detach() for name in ("lA", "lb", "uA", "ub"))
    batch, n = points.shape[:2]
    values = case.outputs(points).detach().reshape(batch, n, -1)
    rows = values.shape[2]
    assert lA.shape == (batch, rows, *case.box.shape[1:]), lA.shape
    assert uA.shape == lA.shape
    assert lb.shape == (batch, rows)
    assert ub.shape == lb.shape
    flat_points = points.flatten(2)
    lower = torch.einsum("bkd,bnd->bnk", lA.flatten(2), flat_points) + lb.unsqueeze(1)
    upper = torch.einsum("bkd,bnd->bnk", uA.flatten(2), flat_points) + ub.unsqueeze(1)
    below = (lower - values - tolerance(values)).max()
    above = (values - upper - tolerance(values)).max()
    assert below <= 0, f"linear lower bound above f by {float(below):.3e}"
    assert above <= 0, f"linear upper bound below f by {float(above):.3e}"


def _n_out(model: nn.Module, box: Box) -> int:
    with torch.no_grad():
        out = reference_forward(model, box.center, box.center)
    return out[0].numel()


# --- the tests ----------------------------------------------------------------------------------


def _seed(*parts: object) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(repr(parts))) % (2**31)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("architecture", sorted(EVAL_ARCHITECTURES))
def test_eval_mode_bounds_are_sound(architecture: str, spec: str) -> None:
    for net_seed, batch in ((0, 1), (1, 3)):
        seed = _seed(architecture, spec, net_seed)
        model, input_shape = build(EVAL_ARCHITECTURES[architecture], seed, train=False)
        gen = torch.Generator().manual_seed(seed + 1)
        box = random_box(gen, batch, input_shape)
        C = random_spec(spec, gen, batch, _n_out(model, box))
        check_case(Case(model, box, C), gen)


@pytest.mark.parametrize("spec", ["none", "margin", "shared"])
@pytest.mark.parametrize("architecture", sorted(TRAIN_ARCHITECTURES))
def test_train_mode_batch_norm_bounds_are_sound(architecture: str, spec: str) -> None:
    for net_seed, batch in ((0, 2), (1, 4)):
        seed = _seed("train", architecture, spec, net_seed)
        model, input_shape = build(TRAIN_ARCHITECTURES[architecture], seed, train=True)
        gen = torch.Generator().manual_seed(seed + 1)
        box = random_box(gen, batch, input_shape)
        # The reference forward is what a train-mode pass of the centre batch computes.
        twin = _dropout_off(model)
        with torch.no_grad():
            torch.testing.assert_close(
                reference_forward(model, box.center, box.center), twin(box.center)
            )
        C = random_spec(spec, gen, batch, _n_out(model, box))
        check_case(Case(model, box, C), gen)


def test_batch_norm_without_running_stats_uses_batch_statistics_in_eval_mode() -> None:
    gen = torch.Generator().manual_seed(7)
    model = _randomise(
        nn.Sequential(
            nn.Linear(3, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.ReLU(),
            nn.Linear(5, 2),
        ),
        gen,
    ).eval()
    box = random_box(gen, 3, (3,))
    check_case(Case(model, box, None), gen)


def test_train_mode_bounds_differ_from_eval_mode_bounds() -> None:
    # Guards the reference above: if the bounds ignored batch statistics, the train-mode
    # soundness tests could pass against the wrong function.
    model, input_shape = build(_mlp_bn, 3, train=True)
    box = random_box(torch.Generator().manual_seed(3), 4, input_shape)
    train_bounds = ibp(model, box)
    model.eval()
    eval_bounds = ibp(model, box)
    assert not torch.allclose(train_bounds.lower, eval_bounds.lower)


def test_sampled_points_reach_the_bounds_of_an_affine_network() -> None:
    # Guards the sampler: with no ReLU every method is exact, so the extreme sampled values
    # must meet the bounds (a sampler that misses the vertices would fail here).
    model, input_shape = build(_affine_only, 11, train=False)
    gen = torch.Generator().manual_seed(11)
    box = random_box(gen, 2, input_shape)
    C = random_spec("random", gen, 2, 5)
    case = Case(model, box, C)
    values = case.outputs(sample_points(case, gen)).detach()
    for method in (ibp, crown, crown_ibp, alpha_crown):
        bounds = method(model, box, C)
        torch.testing.assert_close(values.min(dim=1).values, bounds.lower, rtol=0, atol=1e-9)
        torch.testing.assert_close(values.max(dim=1).values, bounds.upper, rtol=0, atol=1e-9)


def test_alpha_crown_tightens_crown_somewhere() -> None:
    # Guards the relation checks above: an optimiser that never moved would satisfy them.
    model, input_shape = build(_mlp, 21, train=False)
    box = random_box(torch.Generator().manual_seed(21), 3, input_shape)
    tight, loose = alpha_crown(model, box, steps=20), crown(model, box)
    assert (tight.lower > loose.lower + 1e-6).any()
    assert (tight.upper < loose.upper - 1e-6).any()


def test_zero_width_box_gives_the_point_value() -> None:
    model, input_shape = build(_cnn_strided, 5, train=False)
    x = torch.rand((2, *input_shape), generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    box = Box.from_linf(x, 0.0)
    expected = model(x)
    for method in (ibp, crown, crown_ibp, alpha_crown):
        bounds = method(model, box)
        torch.testing.assert_close(bounds.lower, expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(bounds.upper, expected, rtol=0, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("architecture", sorted(EVAL_ARCHITECTURES))
def test_eval_mode_bounds_are_sound_sweep(architecture: str, seed: int) -> None:
    spec = SPECS[seed % len(SPECS)]
    full_seed = _seed("sweep", architecture, seed)
    model, input_shape = build(EVAL_ARCHITECTURES[architecture], full_seed, train=False)
    gen = torch.Generator().manual_seed(full_seed + 1)
    box = random_box(gen, 1 + seed % 4, input_shape)
    C = random_spec(spec, gen, box.shape[0], _n_out(model, box))
    check_case(Case(model, box, C), gen, alpha_steps=30, thorough=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("architecture", sorted(TRAIN_ARCHITECTURES))
def test_train_mode_bounds_are_sound_sweep(architecture: str, seed: int) -> None:
    spec = SPECS[seed % len(SPECS)]
    full_seed = _seed("train-sweep", architecture, seed)
    model, input_shape = build(TRAIN_ARCHITECTURES[architecture], full_seed, train=True)
    gen = torch.Generator().manual_seed(full_seed + 1)
    box = random_box(gen, 2 + seed % 3, input_shape)
    C = random_spec(spec, gen, box.shape[0], _n_out(model, box))
    check_case(Case(model, box, C), gen, alpha_steps=30, thorough=True)
