"""Bounds on graphs: residual joins, max pooling, concatenation, traced PyTorch models.

Soundness is checked on sampled points (and box corners) of random small graphs; on chains the
graph passes must agree with the chain-specialised ones.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tightrope.bounds import (
    Box,
    crown,
    crown_ibp,
    graph,
    ibp,
    ibp_trace,
    linear_bounds,
    margin_spec,
)
from tightrope.bounds.modules import Add, Concat, Pad, Permute, Reshape
from tightrope.bounds.network import MaxPool, lower, rule_for

DTYPE = torch.float64


class Residual(nn.Module):
    """conv-BN-ReLU-conv plus a shortcut (identity or a 1x1 convolution), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, generator: torch.Generator) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.bn = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut: nn.Module = (
            nn.Identity() if c_in == c_out and stride == 1 else nn.Conv2d(c_in, c_out, 1, stride)
        )
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5, generator=generator)
            self.bn.running_var.uniform_(0.5, 2.0, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))) + self.shortcut(x))


class TwoBranches(nn.Module):
    """Two convolutional branches joined by concatenation and by a difference."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU())
        self.right = nn.Sequential(Pad((1, 1, 1, 1)), nn.Conv2d(2, 3, 3), nn.ReLU())
        self.join = Concat(0)
        self.add = Add()

    def forward(self, x: Tensor) -> Tensor:
        left, right = self.left(x), self.right(x)
        both = self.join(left, right)
        return self.add(both, torch.cat([right, left], dim=1)) - 0.5 * both


def _models(generator: torch.Generator) -> list[nn.Module]:
    return [
        nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), Residual(2, 2, 1, generator),
                      nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 4)),
        nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), Residual(3, 4, 2, generator),
                      Residual(4, 4, 1, generator), nn.Flatten(), nn.Linear(4 * 4 * 4, 4)),
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.ReLU(),
                      nn.Conv2d(2, 3, 3, padding=1), nn.MaxPool2d(2, 1), Permute((1, 2, 0)),
                      Reshape((2 * 2 * 3,)), nn.Linear(12, 4)),
        nn.Sequential(nn.Conv2d(1, 2, 3, 2, 1), TwoBranches(), nn.ReLU(), nn.Flatten(),
                      nn.Linear(6 * 4 * 4, 4)),
    ]


def _randomise(model: nn.Module, generator: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=DTYPE) * 0.7)
    return model.eval()


def _samples(box: Box, count: int, generator: torch.Generator) -> Tensor:
    """``(B, count, *S)`` points of each box: its corners' mix and uniform points."""
    shape = (box.lower.shape[0], count, *box.lower.shape[1:])
    unit = torch.rand(shape, generator=generator, dtype=DTYPE)
    unit[:, : count // 2] = unit[:, : count // 2].round()  # vertices, where extremes sit
    return box.lower.unsqueeze(1) + unit * (box.upper - box.lower).unsqueeze(1)


CASES = [(model, seed) for model in range(4) for seed in range(3)]


@pytest.mark.parametrize(("which", "seed"), CASES)
def test_graph_bounds_contain_every_sampled_output(which: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(100 * which + seed)
    model = _randomise(_models(generator)[which].to(DTYPE), generator)
    assert not lower(model, torch.zeros(0, 1, 8, 8, dtype=DTYPE)).is_relu_chain
    x = torch.rand((3, 1, 8, 8), generator=generator, dtype=DTYPE)
    box = Box.from_linf(x, 0.1)
    C = margin_spec(torch.tensor([0, 1, 3]), 4)
    points = _samples(box, 600, generator)
    with torch.no_grad():
        out = model(points.flatten(0, 1)).view(3, 600, 4)
    values = torch.einsum("bkn,bsn->bsk", C.to(DTYPE), out)
    low, high = values.min(dim=1).values, values.max(dim=1).values
    plain = model(points.flatten(0, 1)).view(3, 600, 4)
    bounds = {
        "ibp": ibp(model, box, C),
        "crown_ibp": crown_ibp(model, box, C),
        "crown": crown(model, box, C),
        "ibp_out": ibp(model, box),
        "crown_out": crown(model, box),
    }
    slack = 1e-9
    for name in ("ibp", "crown_ibp", "crown"):
        assert bool((bounds[name].lower <= low + slack).all()), name
        assert bool((bounds[name].upper >= high - slack).all()), name
    for name in ("ibp_out", "crown_out"):
        assert bool((bounds[name].lower <= plain.min(dim=1).values + slack).all()), name
        assert bool((bounds[name].upper >= plain.max(dim=1).values - slack).all()), name
    # CROWN is never looser than its intersection with IBP at intermediate layers would allow
    # at the output on these small nets: at least as tight as IBP's output on average.
    assert float(bounds["crown"].lower.mean()) >= float(bounds["ibp"].lower.mean()) - 1e-9
    linear = linear_bounds(model, box, C)
    on_points = torch.einsum("bkn,bsn->bsk", linear.lA.flatten(2), points.flatten(2))
    assert bool((on_points + linear.lb.unsqueeze(1) <= values + slack).all())
    upper_points = torch.einsum("bkn,bsn->bsk", linear.uA.flatten(2), points.flatten(2))
    assert bool((upper_points + linear.ub.unsqueeze(1) >= values - slack).all())
    trace = ibp_trace(model, box, C)
    assert torch.equal(trace.output.lower, bounds["ibp"].lower)


@pytest.mark.parametrize("seed", range(5))
def test_graph_passes_equal_the_chain_passes_on_a_chain(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    model = _randomise(nn.Sequential(
        nn.Conv2d(1, 3, 3, 2, 1), nn.ReLU(), nn.Conv2d(3, 4, 3, 1, 1), nn.ReLU(), nn.Flatten(),
        nn.Linear(64, 10), nn.ReLU(), nn.Linear(10, 4),
    ).to(DTYPE), generator)
    x = torch.rand((4, 1, 8, 8), generator=generator, dtype=DTYPE)
    box = Box.from_linf(x, 0.05)
    C = margin_spec(torch.tensor([0, 1, 2, 3]), 4).to(DTYPE)
    net = lower(model, x[:0])
    assert net.is_relu_chain
    expected = {True: crown(model, box, C), False: crown_ibp(model, box, C)}
    for use_crown, chain_bounds in expected.items():
        _, relaxations = graph.graph_pre_activations(net, box, use_crown, _policy())
        found = graph.output_bounds(net, box, C.view(4, 3, 4), relaxations, upper=True)
        torch.testing.assert_close(found.lower, chain_bounds.lower, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(found.upper, chain_bounds.upper, rtol=1e-9, atol=1e-9)
    tail = graph.tail_interval_bounds(net, box, C)
    torch.testing.assert_close(tail.lower, ibp(model, box, C).lower, rtol=1e-9, atol=1e-9)


def _policy():  # type: ignore[no-untyped-def]
    from tightrope.bounds import LowerSlope

    return LowerSlope.ADAPTIVE


def test_max_pool_relaxation_is_exact_where_one_input_dominates() -> None:
    lower = torch.tensor([[[[5.0, 0.0], [1.0, -1.0]]]], dtype=DTYPE)
    upper = torch.tensor([[[[6.0, 4.0], [2.0, 0.5]]]], dtype=DTYPE)
    relaxation = graph.max_pool_relaxation(MaxPool((2, 2), (2, 2), (0, 0)), Box(lower, upper))
    assert relaxation.chosen.tolist() == [[[0]]]
    assert relaxation.exact.tolist() == [[[[True]]]]
    assert relaxation.upper.tolist() == [[[[6.0]]]]
    upper[0, 0, 0, 1] = 5.5
    relaxation = graph.max_pool_relaxation(MaxPool((2, 2), (2, 2), (0, 0)), Box(lower, upper))
    assert relaxation.exact.tolist() == [[[[False]]]]


def test_every_domain_refuses_an_op_kind_it_has_no_rule_for() -> None:
    class Mystery:
        name = "mystery op"

    from tightrope.bounds import graph_certificate, graph_encoding
    from tightrope.bounds.network import OP_KINDS

    tables = ((graph.INTERVAL_RULES, "interval propagation"),
              (graph.BACKWARD_RULES, "the backward (CROWN) pass"),
              (graph_certificate.SOUND_INTERVAL_RULES, "sound interval propagation"),
              (graph_certificate.CERTIFIED_RULES, "the certified backward pass"),
              (graph_certificate.MAGNITUDE_RULES, "the certified pass's magnitudes"),
              (graph_encoding.ENCODING_RULES, "the LP/MILP encoding"))
    for table, domain in tables:
        assert set(table) == set(OP_KINDS), domain  # every op kind has a rule in every domain
        with pytest.raises(NotImplementedError, match=r"Mystery.*mystery op"):
            rule_for(table, Mystery(), domain)


def test_untraceable_and_unsupported_models_get_errors_that_name_the_node() -> None:
    class Squares(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x * x + torch.sigmoid(x)

    with pytest.raises(TypeError, match=r"mul.*not linear.*sigmoid"):
        ibp(Squares(), Box.from_linf(torch.zeros(1, 3), 0.1))

    class Branchy(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x if bool(x.sum() > 0) else -x

    with pytest.raises(TypeError, match="cannot trace Branchy"):
        ibp(Branchy(), Box.from_linf(torch.zeros(1, 3), 0.1))


def test_chain_only_passes_name_what_they_lack() -> None:
    from tightrope.bounds import alpha_crown

    generator = torch.Generator().manual_seed(0)
    model = _randomise(_models(generator)[0].to(DTYPE), generator)
    box = Box.from_linf(torch.rand((1, 1, 8, 8), dtype=DTYPE), 0.1)
    with pytest.raises(NotImplementedError, match="MaxPool"):
        alpha_crown(model, box, margin_spec(torch.tensor([0]), 4))


@pytest.mark.parametrize(("which", "seed"), CASES)
def test_certified_graph_bounds_are_sound_and_close_to_crown(which: int, seed: int) -> None:
    from tightrope.bounds.graph_certificate import graph_certified_bounds

    generator = torch.Generator().manual_seed(100 * which + seed + 7)
    model = _randomise(_models(generator)[which].to(DTYPE), generator)
    x = torch.rand((3, 1, 8, 8), generator=generator, dtype=DTYPE)
    box = Box.from_linf(x, 0.1)
    C = margin_spec(torch.tensor([0, 1, 3]), 4).to(DTYPE)
    net = lower(model, x[:0])
    offsets = torch.tensor([0.1, -0.2, 0.0], dtype=DTYPE)
    certified = graph_certified_bounds(net, box, C, offsets)
    interval_only = graph_certified_bounds(net, box, C, offsets, crown=False)
    points = _samples(box, 600, generator)
    with torch.no_grad():
        out = model(points.flatten(0, 1)).view(3, 600, 4)
    values = torch.einsum("bkn,bsn->bsk", C, out) - offsets
    assert bool((certified <= values.min(dim=1).values).all())
    assert bool((certified >= interval_only).all())
    # On CROWN's own boxes and relaxations the certified dual bound is CROWN's bound up to
    # rounding (never below it in exact arithmetic: the ReLU terms are exact minima).
    from tightrope.bounds import LowerSlope
    from tightrope.bounds.graph_certificate import graph_certified_lower

    with torch.no_grad():
        boxes, relaxations = graph.graph_pre_activations(net, box, True, LowerSlope.ADAPTIVE)
        plain = graph.output_bounds(net, box, C, relaxations, upper=False).lower - offsets
        dual = graph_certified_lower(net, len(net.ops), C, box, boxes, relaxations, offsets)
    assert bool((dual >= plain - 1e-9 * (1 + plain.abs())).all())
    assert bool((dual <= values.min(dim=1).values).all())


def test_certified_graph_bounds_refuse_to_close_on_nan_or_overflow() -> None:
    from tightrope.bounds.graph_certificate import graph_certified_bounds

    generator = torch.Generator().manual_seed(3)
    model = _randomise(_models(generator)[1].to(DTYPE), generator)
    x = torch.rand((2, 1, 8, 8), generator=generator, dtype=DTYPE)
    net = lower(model, x[:0])
    C = margin_spec(torch.tensor([0, 1]), 4).to(DTYPE)
    huge = Box(x - 1e308, x + 1e308)
    assert bool((graph_certified_bounds(net, huge, C) == float("-inf")).all())
    nan_box = Box(x.clone(), x.clone())
    nan_box.lower[0, 0, 0, 0] = float("nan")
    assert bool((graph_certified_bounds(net, nan_box, C)[0] == float("-inf")).all())


@pytest.mark.parametrize(("which", "seed"), CASES[::2])
def test_graph_alpha_crown_is_sound_and_at_least_crown(which: int, seed: int) -> None:
    from tightrope.bounds.graph_certificate import (
        graph_alpha_bounds,
        graph_certified_bounds,
        graph_certified_root,
    )

    generator = torch.Generator().manual_seed(100 * which + seed + 11)
    model = _randomise(_models(generator)[which].to(DTYPE), generator)
    x = torch.rand((2, 1, 8, 8), generator=generator, dtype=DTYPE)
    box = Box.from_linf(x, 0.1)
    C = margin_spec(torch.tensor([0, 2]), 4).to(DTYPE)
    net = lower(model, x[:0])
    root = graph_certified_root(net, box, C.shape[1])
    crown_bound = graph_certified_bounds(net, box, C, root=root)
    alpha_bound = graph_alpha_bounds(net, box, C, root, steps=15, lr=0.1)
    assert bool((alpha_bound >= crown_bound - 1e-9 * (1 + crown_bound.abs())).all())
    points = _samples(box, 600, generator)
    with torch.no_grad():
        out = model(points.flatten(0, 1)).view(2, 600, 4)
    values = torch.einsum("bkn,bsn->bsk", C, out)
    assert bool((alpha_bound <= values.min(dim=1).values).all())


def test_a_cached_trace_follows_a_replaced_module() -> None:
    generator = torch.Generator().manual_seed(4)
    model = _randomise(_models(generator)[0].to(DTYPE), generator)
    x = torch.rand((1, 1, 8, 8), generator=generator, dtype=DTYPE)
    point = Box(x, x)
    with torch.no_grad():
        torch.testing.assert_close(ibp(model, point).lower, model(x))
        model[2] = _randomise(TwoBranches().to(DTYPE), generator)  # another forward
        model[5] = nn.Linear(6 * 4 * 4, 4).to(DTYPE)
        torch.testing.assert_close(ibp(model, point).lower, model(x))
        torch.testing.assert_close(crown(model, point).lower, model(x))


def _tiny_models(generator: torch.Generator) -> list[nn.Module]:
    """Graphs small enough for the exact MILP: 1 x 6 x 6 inputs."""
    return [
        nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), Residual(2, 2, 1, generator),
                      nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)),
        nn.Sequential(nn.Conv2d(1, 2, 3, 2, 1), TwoBranches(), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                      nn.Flatten(), nn.Linear(6 * 2 * 2, 3)),
    ]


@pytest.mark.parametrize(("which", "seed"), [(w, s) for w in range(2) for s in range(3)])
def test_bounds_on_graphs_never_pass_the_exact_milp_optimum(which: int, seed: int) -> None:
    pytest.importorskip("scipy")
    from tightrope.bounds import lp_bound, milp_bound

    generator = torch.Generator().manual_seed(100 * which + seed + 21)
    model = _randomise(_tiny_models(generator)[which].to(DTYPE), generator)
    x = torch.rand((1, 1, 6, 6), generator=generator, dtype=DTYPE)
    box = Box.from_linf(x, 0.03)
    C = margin_spec(torch.tensor([1]), 3).to(DTYPE)
    exact = milp_bound(model, box, C)  # the true extremes of C f over the box
    relaxed = lp_bound(model, box, C)
    points = _samples(box, 400, generator)
    with torch.no_grad():
        values = torch.einsum("bkn,bsn->bsk", C, model(points.flatten(0, 1)).view(1, 400, 3))
        crown_bounds = crown(model, box, C)
        ibp_bounds = ibp(model, box, C)
    slack = 1e-7
    assert bool((exact.lower <= values.min(dim=1).values + slack).all())
    assert bool((exact.upper >= values.max(dim=1).values - slack).all())
    for name, found in (("ibp", ibp_bounds), ("crown", crown_bounds), ("lp", relaxed)):
        assert bool((found.lower <= exact.lower + slack).all()), name
        assert bool((found.upper >= exact.upper - slack).all()), name
    # The LP is at least as tight as CROWN on the same intermediate bounds.
    assert bool((relaxed.lower >= crown_bounds.lower - 1e-6).all())
    assert bool((relaxed.upper <= crown_bounds.upper + 1e-6).all())


@pytest.mark.parametrize("seed", range(3))
def test_patch_passes_equal_dense_passes(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from tightrope.bounds import LowerSlope, patches

    generator = torch.Generator().manual_seed(seed + 50)
    model = _randomise(_models(generator)[1].to(DTYPE), generator)  # two residual blocks
    x = torch.rand((2, 1, 8, 8), generator=generator, dtype=DTYPE)
    box = Box.from_linf(x, 0.05)
    net = lower(model, x[:0])
    found = {}
    for share in (0.0, 1e9):  # dense everywhere, then windows wherever they apply
        monkeypatch.setattr(patches, "MAX_SHARE", share)
        found[share], relaxations = graph.graph_pre_activations(net, box, True,
                                                                LowerSlope.ADAPTIVE)
    assert sum(patches.patchable(net, net.op_inputs[i][0], relaxations) for i in found[1e9]) >= 3
    for index, dense in found[0.0].items():
        torch.testing.assert_close(found[1e9][index].lower, dense.lower, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(found[1e9][index].upper, dense.upper, rtol=1e-9, atol=1e-9)


def test_a_selected_certified_root_equals_the_root_of_those_samples() -> None:
    from tightrope.bounds.graph_certificate import graph_certified_bounds, graph_certified_root

    generator = torch.Generator().manual_seed(9)
    model = _randomise(_models(generator)[0].to(DTYPE), generator)
    x = torch.rand((4, 1, 8, 8), generator=generator, dtype=DTYPE)
    box = Box.from_linf(x, 0.05)
    C = margin_spec(torch.tensor([0, 1, 2, 3]), 4).to(DTYPE)
    net = lower(model, x[:0])
    picked = torch.tensor([3, 1])
    sub_box = Box(box.lower[picked], box.upper[picked])
    selected = graph_certified_root(net, box, 3).select(picked)
    fresh = graph_certified_root(net, sub_box, 3)
    for index, found in selected.boxes.items():
        torch.testing.assert_close(found.lower, fresh.boxes[index].lower)
    torch.testing.assert_close(graph_certified_bounds(net, sub_box, C[picked], root=selected),
                               graph_certified_bounds(net, sub_box, C[picked], root=fresh))
