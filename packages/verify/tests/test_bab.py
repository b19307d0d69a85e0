"""Branch-and-bound against the exact MILP oracle on tiny networks: never a wrong answer.

Random float64 MLPs and random robustness properties with radii around the decision boundary;
attacks are switched off so that branch-and-bound itself must find counterexamples. Whatever
BaB answers must match the sign of the MILP minimum of the margins (``VERIFIED`` iff every
margin's minimum is positive); ``FALSIFIED`` must come with a point the specification rejects.
A few dozen properties run in the normal suite, a few hundred under ``-m slow``.
"""

from __future__ import annotations

import time
from typing import ClassVar

import pytest
import torch
from torch import nn

from tightrope.bounds import Box, margin_spec, milp_bound
from tightrope.verify import (
    BabConfig,
    Branching,
    InputSplit,
    LayerOrder,
    SearchOrder,
    Stage,
    VerifierConfig,
    VerifyStatus,
    robustness_spec,
    verify,
)
from tightrope.verify.branching import LayerIndex, shallow_first
from tightrope.verify.domains import DomainBatch, DomainQueue

DTYPE = torch.float64

pytest.importorskip("scipy")


def bab_only(**bab: object) -> VerifierConfig:
    """No attacks: only bounds and branch-and-bound decide."""
    return VerifierConfig(attack_restarts=0, strong_attack_restarts=0,
                          bab=BabConfig(batch_size=16, max_domains=20_000, **bab))  # type: ignore[arg-type]


def case(seed: int, inputs: int = 5, width: int = 16, depth: int = 2):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    previous = inputs
    for _ in range(depth):
        layers += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    model = nn.Sequential(*layers, nn.Linear(previous, 3)).to(DTYPE).eval()
    x = torch.rand(1, inputs, generator=generator, dtype=DTYPE)
    label = int(model(x).argmax())
    eps = 0.05 + 0.4 * float(torch.rand(1, generator=generator, dtype=DTYPE))
    return model, x, label, eps


def truth(model: nn.Module, x: torch.Tensor, label: int, eps: float) -> bool:
    exact = milp_bound(model, Box.from_linf(x, eps), margin_spec(torch.tensor([label]), 3),
                       upper=False).lower
    return bool((exact > 0).all())


def check_agreement(seeds: range, config: VerifierConfig, **shape: int) -> dict[str, int]:
    answers = {"verified": 0, "falsified": 0, "bab": 0}
    for seed in seeds:
        model, x, label, eps = case(seed, **shape)
        spec = robustness_spec(x, label, eps, 3)
        verdict = verify(model, spec, timeout=60.0, config=config)
        holds = truth(model, x, label, eps)
        assert verdict.status in (VerifyStatus.VERIFIED, VerifyStatus.FALSIFIED), (seed, verdict)
        assert (verdict.status is VerifyStatus.VERIFIED) == holds, (seed, verdict, holds)
        if verdict.status is VerifyStatus.FALSIFIED:
            assert verdict.counterexample is not None
            assert verdict.output is not None
            assert spec.violated_by(verdict.counterexample, verdict.output)
            answers["falsified"] += 1
        else:
            answers["verified"] += 1
        answers["bab"] += verdict.stage is Stage.BAB
    return answers


@pytest.mark.parametrize(
    ("branching", "order"),
    [(Branching.FSB, SearchOrder.BEST_FIRST), (Branching.BABSR, SearchOrder.DEPTH_FIRST)],
)
def test_relu_bab_agrees_with_milp(branching: Branching, order: SearchOrder) -> None:
    config = bab_only(branching=branching, order=order, input_split=InputSplit.NEVER)
    answers = check_agreement(range(12), config)
    # The sample must exercise both answers and branch-and-bound itself.
    assert answers["verified"], answers
    assert answers["falsified"], answers
    assert answers["bab"] >= 3, answers


def test_input_bab_agrees_with_milp() -> None:
    answers = check_agreement(range(100, 110), bab_only(input_split=InputSplit.ALWAYS),
                              inputs=2)
    assert answers["verified"], answers
    assert answers["falsified"], answers


@pytest.mark.slow
@pytest.mark.parametrize("split", [InputSplit.NEVER, InputSplit.ALWAYS])
def test_bab_agrees_with_milp_on_hundreds(split: InputSplit) -> None:
    seeds = range(1000, 1200) if split is InputSplit.NEVER else range(2000, 2100)
    inputs = 5 if split is InputSplit.NEVER else 3
    answers = check_agreement(seeds, bab_only(input_split=split), inputs=inputs)
    assert answers["bab"] >= 20, answers


@pytest.mark.parametrize("layer_order", [LayerOrder.AUTO, LayerOrder.SCORE])
def test_deeper_nets_agree_with_milp(layer_order: LayerOrder) -> None:
    answers = check_agreement(
        range(200, 206), bab_only(input_split=InputSplit.NEVER, layer_order=layer_order),
        width=10, depth=3)
    assert answers["verified"] + answers["falsified"] == 6


def test_shallow_first_on_two_layer_nets_agrees_with_milp() -> None:
    config = bab_only(input_split=InputSplit.NEVER, layer_order=LayerOrder.SHALLOW_FIRST)
    answers = check_agreement(range(12), config)
    assert answers["verified"], answers
    assert answers["falsified"], answers
    assert answers["bab"] >= 3, answers


@pytest.mark.slow
def test_shallow_first_agrees_with_milp_on_a_hundred_deeper_nets() -> None:
    answers = check_agreement(range(3000, 3100), bab_only(input_split=InputSplit.NEVER),
                              width=10, depth=3)
    assert answers["bab"] >= 5, answers


class _ThreeLayers:
    """A stand-in for a lowered network with ReLU layers of 2, 3 and 2 neurons."""

    relu_indices = (1, 3, 5)
    shapes: ClassVar[dict[int, tuple[int, ...]]] = {1: (2,), 3: (3,), 5: (2,)}


def test_shallow_first_keeps_only_the_shallowest_splittable_layer() -> None:
    layers = LayerIndex(_ThreeLayers())  # type: ignore[arg-type]
    inf = float("inf")
    scores = torch.tensor([
        [0.5, -inf, 0.1, 9.0, -inf, 7.0, 1.0],   # layer 0 splittable
        [-inf, -inf, -inf, 2.0, 0.0, 3.0, -inf],  # layer 0 done: layer 1 only
        [-inf, -inf, -inf, -inf, -inf, -inf, 4.0],  # only the last layer left
        [-inf] * 7,                                # nothing to split
    ])
    found = shallow_first(scores, layers)
    expected = torch.tensor([
        [0.5, -inf, -inf, -inf, -inf, -inf, -inf],
        [-inf, -inf, -inf, 2.0, 0.0, -inf, -inf],
        [-inf, -inf, -inf, -inf, -inf, -inf, 4.0],
        [-inf] * 7,
    ])
    assert torch.equal(found, expected)


def test_queue_pops_lowest_then_deepest() -> None:
    def batch(values: list[float], depths: list[int]) -> DomainBatch:
        count = len(values)
        return DomainBatch(pre={}, signs={}, alphas={}, betas={},
                           lower=torch.tensor(values).unsqueeze(1),
                           scores=torch.zeros(count, 1), depth=torch.tensor(depths))

    queue = DomainQueue()
    queue.push(batch([0.5, -2.0, -1.0], [1, 2, 3]))
    queue.push(batch([-3.0, 0.1], [9, 0]))
    lowest = queue.pop(2)
    assert sorted(lowest.value.tolist()) == [-3.0, -2.0]
    assert len(queue) == 3
    deepest = queue.pop(1, deepest=True)
    assert deepest.depth.tolist() == [3]
    assert sorted(queue.pop(5).value.tolist()) == pytest.approx([0.1, 0.5])
    assert len(queue) == 0


def test_the_milp_fallback_agrees_with_the_oracle() -> None:
    """With almost no time for branch-and-bound, the exact MILP decides the open sets."""
    config = bab_only(input_split=InputSplit.NEVER, milp_after=1e-9)
    stages = {}
    for seed in range(300, 312):
        model, x, label, eps = case(seed)
        spec = robustness_spec(x, label, eps, 3)
        verdict = verify(model, spec, timeout=60.0, config=config)
        assert verdict.status in (VerifyStatus.VERIFIED, VerifyStatus.FALSIFIED), (seed, verdict)
        assert (verdict.status is VerifyStatus.VERIFIED) == truth(model, x, label, eps), seed
        if verdict.status is VerifyStatus.FALSIFIED:
            assert verdict.output is not None
            assert verdict.counterexample is not None
            assert spec.violated_by(verdict.counterexample, verdict.output)
        stages[verdict.stage] = stages.get(verdict.stage, 0) + 1
    assert stages.get(Stage.MILP, 0) >= 2, stages


def test_no_milp_when_switched_off() -> None:
    config = bab_only(input_split=InputSplit.NEVER, milp_after=1.0)
    for seed in range(300, 306):
        model, x, label, eps = case(seed)
        verdict = verify(model, robustness_spec(x, label, eps, 3), timeout=60.0, config=config)
        assert verdict.stage is not Stage.MILP
        assert (verdict.status is VerifyStatus.VERIFIED) == truth(model, x, label, eps), seed


def test_automatic_settings_follow_the_network_depth() -> None:
    auto = BabConfig()
    assert [auto.fsb_width(n) for n in (1, 2, 3, 6)] == [32, 32, 16, 16]
    assert [auto.milp_share(n) for n in (1, 2, 3, 6)] == [0.2, 0.2, 1.0, 1.0]
    assert [auto.layers_to_split(n) for n in (2, 3)] == [LayerOrder.SCORE,
                                                         LayerOrder.SHALLOW_FIRST]
    # Shallow-first pays only where the search refines later layers by CROWN (chains).
    assert auto.layers_to_split(6, crown_refined=False) is LayerOrder.SCORE
    assert BabConfig(refine_intermediate=False).layers_to_split(6) is LayerOrder.SCORE
    assert [auto.milp_share(n, max_pooling=True) for n in (2, 6)] == [0.2, 0.2]
    assert [auto.refine_share(n) for n in (2, 3, 6)] == [0.0, 0.3, 0.3]
    assert BabConfig(deep_layers=5).fsb_width(4) == 32
    given = BabConfig(fsb_candidates=7, milp_after=0.5, layer_order=LayerOrder.SCORE,
                      split_refine=0.0)
    assert [given.fsb_width(n) for n in (2, 3)] == [7, 7]
    assert [given.milp_share(n) for n in (2, 3)] == [0.5, 0.5]
    assert given.refine_share(6) == 0.0
    assert given.layers_to_split(6) is LayerOrder.SCORE
    with pytest.raises(ValueError, match="deep_layers"):
        BabConfig(deep_layers=0)
    with pytest.raises(ValueError, match="fsb_candidates"):
        BabConfig(fsb_candidates=0)


@pytest.mark.parametrize("deep_layers", [2, 3])
def test_the_search_and_the_milp_switch_use_the_depth_settings(
    deep_layers: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a two-layer net, ``deep_layers=2`` makes it deep: FSB gets the deep width and no
    unsafe set goes to the MILP; with ``deep_layers=3`` it keeps the shallow ones."""
    import tightrope.verify.bab as bab_module
    import tightrope.verify.cascade as cascade_module

    widths: list[int] = []
    choose = bab_module.fsb_choice

    def spy(*args: object) -> torch.Tensor:
        widths.append(args[5])  # type: ignore[arg-type]
        return choose(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(bab_module, "fsb_choice", spy)
    stages = []
    config = bab_only(input_split=InputSplit.NEVER, deep_layers=deep_layers)
    for seed in range(300, 312):
        model, x, label, eps = case(seed)
        verdict = verify(model, robustness_spec(x, label, eps, 3), timeout=60.0, config=config)
        assert (verdict.status is VerifyStatus.VERIFIED) == truth(model, x, label, eps), seed
        stages.append(verdict.stage)
    assert widths, "branch-and-bound never branched"
    assert set(widths) == {16 if deep_layers == 2 else 32}
    # Branch-and-bound gets no deadline short of the whole timeout on a deep network.
    deadlines: list[float] = []
    search = cascade_module.relu_bab

    def timed(*args: object, **kwargs: object) -> object:
        deadlines.append(kwargs["deadline"] - time.monotonic())  # type: ignore[operator]
        return search(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cascade_module, "relu_bab", timed)
    model, x, label, eps = case(next(s for s, stage in zip(range(300, 312), stages, strict=True)
                                     if stage is Stage.BAB))
    verify(model, robustness_spec(x, label, eps, 3), timeout=60.0, config=config)
    assert deadlines
    if deep_layers == 2:
        assert min(deadlines) > 50.0
    else:
        assert max(deadlines) < 0.2 * 60.0 + 1.0


def test_fsb_picks_the_candidate_with_the_best_worse_child_in_any_chunking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FSB's choice is the top-scoring candidate whose worse child bounds highest, the same
    whether the children are bounded in one pass or one parent at a time."""
    from tightrope.bounds import (
        empty_subdomains,
        lower,
        pre_activation_bounds,
        split_lower_bound,
    )
    from tightrope.verify import branching

    # A case where the worse and the better child favour different neurons, and neither
    # is the top-scoring one.
    model, x, label, _ = case(10, width=12, depth=2)
    box = Box.from_linf(x, 0.3)
    net = lower(model, box.center)
    rows = margin_spec(torch.tensor([label]), 3, dtype=DTYPE)[0]
    offsets = torch.zeros(rows.shape[0], dtype=DTYPE)
    layers = branching.LayerIndex(net)
    pre = dict(pre_activation_bounds(net, box).boxes)
    signs = {i: torch.zeros(b.lower.shape, dtype=torch.int8) for i, b in pre.items()}
    C = rows.unsqueeze(0)
    root = split_lower_bound(net, box, C, pre, signs)
    scores = branching.branching_scores(pre, signs, root.relu_coefficients, root.alphas,
                                        root.lower.argmax(dim=1), layers)
    unstable = int(torch.isfinite(scores).sum())
    assert unstable >= 4, unstable
    parents = DomainBatch(pre=pre, signs=signs, alphas=root.alphas,
                          betas={i: torch.zeros_like(a) for i, a in root.alphas.items()},
                          lower=root.lower, scores=scores,
                          depth=torch.zeros(1, dtype=torch.long)).select(torch.zeros(3).long())
    # Three different parents: each has one more neuron fixed.
    first = scores.topk(3).indices[0]
    pre3, signs3 = branching.split_at(parents, first, torch.tensor([1, -1, 1]), layers)
    parents = DomainBatch(pre=pre3, signs=signs3, alphas=parents.alphas, betas=parents.betas,
                          lower=parents.lower, depth=parents.depth,
                          scores=parents.scores.scatter(1, first.unsqueeze(1), float("-inf")))
    whole = branching.fsb_choice(net, box, rows, offsets, parents, 6, layers)
    monkeypatch.setattr(branching, "FSB_CHUNK_BYTES", 1)
    assert torch.equal(branching.fsb_choice(net, box, rows, offsets, parents, 6, layers), whole)
    # Brute force: bound both children of every candidate separately.
    for d in range(3):
        one = parents.select(torch.tensor([d]))
        best_value, best_neuron = float("-inf"), -1
        for neuron in one.scores[0].topk(6).indices.tolist():
            worse = float("inf")
            for phase in (1, -1):
                p, s = branching.split_at(one, torch.tensor([neuron]), torch.tensor([phase]),
                                          layers)
                if bool(empty_subdomains(p).any()):
                    continue
                with torch.no_grad():
                    found = split_lower_bound(net, box, C, p, s, one.alphas, one.betas)
                worse = min(worse, float((found.lower - offsets).max()))
            if worse > best_value:
                best_value, best_neuron = worse, neuron
        assert int(whole[d]) == best_neuron, (d, int(whole[d]), best_neuron)
