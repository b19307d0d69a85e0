"""CROWN and CROWN-IBP: backward linear relaxation bounds.

* CROWN (Zhang et al. 2018, "Efficient Neural Network Robustness Certification with General
  Activation Functions"): every ReLU pre-activation is bounded by its own backward pass, layer
  by layer, then the output.
* CROWN-IBP (Zhang et al. 2020, "Towards Stable and Efficient Training of Verifiably Robust
  Neural Networks"): pre-activations by IBP, one backward pass at the output.

Intermediate bounds are computed for the neurons that interval arithmetic (run from the
already-tightened previous layer) leaves unstable; the others need no relaxation. Each
CROWN bound is intersected with that interval, so it is never looser than either.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tightrope.bounds import graph
from tightrope.bounds.backward import backward_lower, both_sides, input_lower_bound, relu_step
from tightrope.bounds.core import Box, LinearBounds, concretize_lower, features_dot
from tightrope.bounds.interval import interval_pre_activations, propagate_interval
from tightrope.bounds.network import Affine, Network, Relu, expect_relu
from tightrope.bounds.problem import Problem, prepare
from tightrope.bounds.relaxation import LowerSlope, ReluRelaxation, relu_relaxation

__all__ = [
    "Intermediate",
    "PreActivations",
    "crown",
    "crown_ibp",
    "linear_bounds",
    "pre_activation_bounds",
]


class Intermediate(enum.Enum):
    """How the bound functions bound every ReLU's pre-activations (the intermediate bounds)."""

    #: A backward CROWN pass per layer (Zhang et al. 2018): tight, cost grows with depth and
    #: width.
    CROWN = "crown"
    #: Interval bound propagation, as CROWN-IBP does (Zhang et al. 2020): one cheap pass.
    IBP = "ibp"


#: Upper limit on the elements of one coefficient tensor ``(B, rows, *S)`` in the intermediate
#: passes; larger row sets are processed in chunks (about 512 MB in float32).
ROW_CHUNK_ELEMENTS = 1 << 27


@dataclass(frozen=True, slots=True)
class PreActivations:
    """Bounds on the input of every ReLU and their relaxations, keyed by ReLU op index."""

    boxes: Mapping[int, Box]
    relaxations: Mapping[int, ReluRelaxation]


def pre_activation_bounds(
    net: Network,
    box: Box,
    intermediate: Intermediate = Intermediate.CROWN,
    lower_slope: LowerSlope = LowerSlope.ADAPTIVE,
) -> PreActivations:
    """Bounds on every ReLU input of ``net`` (a chain of affine maps and ReLUs) over ``box`` by
    IBP or by CROWN."""
    _check_intermediate(intermediate)
    net.require_chain("pre_activation_bounds")
    if intermediate is Intermediate.IBP:
        found = interval_pre_activations(net, box)
        return PreActivations(found, {i: relu_relaxation(b, lower_slope) for i, b in found.items()})
    boxes: dict[int, Box] = {}
    relaxations: dict[int, ReluRelaxation] = {}
    previous = 0  # first op after the previous ReLU
    state = box  # box of the input of op `previous`
    for index in net.relu_indices:
        interval = propagate_interval(net, state, start=previous, end=index)
        mixing = sum(isinstance(op, Affine) and op.mixing for op in net.ops[:index])
        exact = previous == 0 and mixing <= 1
        if exact:
            bounds = interval
        elif _windowable(net, index):
            bounds = _tighten_windowed(net, index, box, interval, relaxations)
        else:
            bounds = _tighten(net, index, box, interval, relaxations)
        boxes[index] = bounds
        relaxations[index] = relu_relaxation(bounds, lower_slope)
        state = Box(torch.relu(bounds.lower), torch.relu(bounds.upper))
        previous = index + 1
    return PreActivations(boxes, relaxations)


def _check_intermediate(intermediate: object) -> None:
    if not isinstance(intermediate, Intermediate):
        raise TypeError(f"intermediate must be an Intermediate (Intermediate.CROWN or "
                        f"Intermediate.IBP), got {intermediate!r}")


def _tighten(
    net: Network, index: int, box: Box, interval: Box, relaxations: Mapping[int, ReluRelaxation]
) -> Box:
    """CROWN bounds of the neurons that ``interval`` leaves unstable, intersected with it.

    The affine ops between the previous ReLU and this pre-activation are the same map for every
    sample, so they are transposed once per neuron (for the union of the batch's unstable
    neurons) and the rows gathered per sample; only the rest of the pass, through the
    sample-specific relaxations, runs per sample and per side.
    """
    batch = interval.lower.shape[0]
    lower, upper = interval.lower.flatten(1), interval.upper.flatten(1)
    unstable = (lower < 0) & (upper > 0)
    union = unstable.any(dim=0).nonzero().squeeze(1)
    if union.numel() == 0:
        return interval
    split = max((i + 1 for i in net.relu_indices if i < index), default=0)
    shape, split_shape = net.shapes[index], net.shapes[split]
    widest = max(_numel(s) for s in net.shapes[: split + 1])
    chunk = max(1, ROW_CHUNK_ELEMENTS // max(1, 2 * batch * widest, _numel(split_shape)))
    new_lower, new_upper = lower, upper
    for begin in range(0, union.numel(), chunk):
        neurons = union[begin : begin + chunk]
        selector = lower.new_zeros((1, neurons.numel(), lower.shape[1]))
        selector[0, torch.arange(neurons.numel()), neurons] = 1.0
        table, table_bias = backward_lower(
            net, index, selector.view(1, neurons.numel(), *shape), {}, start=split
        )
        local = unstable[:, neurons]
        most = int(local.sum(dim=1).max())
        if most == 0:
            continue
        # Per sample, its unstable neurons of this chunk first; rows past a sample's count are
        # padding and their results are dropped.
        order = torch.argsort(local.to(torch.int8), dim=1, descending=True, stable=True)
        order = order[:, :most]
        A, bias = table[0][order], table_bias[0][order]
        found = input_lower_bound(net, split, torch.cat([A, -A], dim=1), box, relaxations,
                                  bias=torch.cat([bias, -bias], 1))
        new_lower, new_upper = _merge(
            new_lower, new_upper, found, neurons[order], local.gather(1, order)
        )
    return Box(new_lower.view(interval.lower.shape), new_upper.view(interval.upper.shape))


def _merge(
    lower: Tensor, upper: Tensor, found: Tensor, chosen: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor]:
    """Intersect flat bounds ``lower, upper: (B, n)`` at neurons ``chosen: (B, R)`` with
    ``found: (B, 2R)`` (lower bounds, then negated upper bounds) where ``valid``.

    Only a sample's own unstable neurons take new bounds (the other rows are padding), so a
    sample's result does not depend on the rest of its batch.
    """
    rows = chosen.shape[1]
    old_lower, old_upper = lower.gather(1, chosen), upper.gather(1, chosen)
    tight_lower = torch.where(valid, torch.maximum(found[:, :rows], old_lower), old_lower)
    tight_upper = torch.where(valid, torch.minimum(-found[:, rows:], old_upper), old_upper)
    return lower.scatter(1, chosen, tight_lower), upper.scatter(1, chosen, tight_upper)


def _windowable(net: Network, index: int) -> bool:
    """Whether every op before ``index`` maps images to images locally (convolutions, per-channel
    maps, ReLU), so the backward pass of one pre-activation pixel stays in its receptive field."""
    if any(len(shape) != 3 for shape in net.shapes[: index + 1]):
        return False
    return all(
        isinstance(op, Relu)
        or (isinstance(op, Affine) and (op.window_transpose is not None or op.channelwise))
        for op in net.ops[:index]
    )


def _window_backward(
    net: Network,
    end: int,
    start: int,
    A: Tensor,
    corner: tuple[int, int],
    bias: Tensor,
    relaxations: Mapping[int, ReluRelaxation],
) -> tuple[Tensor, tuple[int, int], Tensor]:
    """``backward_lower`` for rows ``A: (B, R, C, h, w)`` supported on the window of ``(h, w)``
    pixels whose top-left pixel is ``corner``; returns the rows on the input window of op
    ``start`` and that window's corner."""
    batch, rows = A.shape[0], A.shape[1]
    for index in range(end - 1, start - 1, -1):
        op = net.ops[index]
        top, left = corner
        height, width = A.shape[-2], A.shape[-1]
        window = (slice(None), slice(None), slice(top, top + height), slice(left, left + width))
        if isinstance(op, Affine):
            bias = bias + features_dot(A, net.offset(index)[window])
            flat = A.flatten(0, 1)
            if op.window_transpose is not None:
                size = (net.shapes[index][1], net.shapes[index][2])
                flat, corner = op.window_transpose(flat, corner, size)
            else:
                assert op.fast_transpose is not None
                flat = op.fast_transpose(flat)
            A = flat.reshape(batch, rows, *flat.shape[1:])
        else:
            expect_relu(op, "the windowed backward pass")
            relaxation = relaxations[index]
            A, bias = relu_step(
                A, bias, relaxation.lower_slope[window].unsqueeze(1),
                relaxation.upper_slope[window], relaxation.upper_intercept[window],
            )
    return A, corner, bias


def _tighten_windowed(
    net: Network, index: int, box: Box, interval: Box, relaxations: Mapping[int, ReluRelaxation]
) -> Box:
    """``_tighten`` for convolutional prefixes: one pass per pre-activation pixel, on the pixel's
    receptive field only (in the spirit of auto_LiRPA's patches mode, without a patch type).

    The rows of one pixel are its unstable channels; the sample-independent affine prefix is
    transposed once per channel and gathered per sample, as in ``_tighten``.
    """
    channels, height, width = net.shapes[index]
    unstable = (interval.lower < 0) & (interval.upper > 0)
    split = max((i + 1 for i in net.relu_indices if i < index), default=0)
    new_lower, new_upper = interval.lower.flatten(1), interval.upper.flatten(1)
    for row in range(height):
        for column in range(width):
            local_all = unstable[:, :, row, column]
            neurons = local_all.any(dim=0).nonzero().squeeze(1)
            count = neurons.numel()
            if count == 0:
                continue
            selector = interval.lower.new_zeros((1, count, channels, 1, 1))
            selector[0, torch.arange(count), neurons] = 1.0
            table, corner, table_bias = _window_backward(
                net, index, split, selector, (row, column),
                interval.lower.new_zeros((1, count)), {},
            )
            local = local_all[:, neurons]
            most = int(local.sum(dim=1).max())
            order = torch.argsort(local.to(torch.int8), dim=1, descending=True, stable=True)
            order = order[:, :most]
            A, bias = table[0][order], table_bias[0][order]
            A, corner, bias = _window_backward(
                net, split, 0, torch.cat([A, -A], dim=1), corner,
                torch.cat([bias, -bias], dim=1), relaxations,
            )
            top, left = corner
            rows = slice(top, top + A.shape[-2])
            columns = slice(left, left + A.shape[-1])
            cropped = Box(box.lower[:, :, rows, columns], box.upper[:, :, rows, columns])
            found = concretize_lower(A, bias, cropped)
            chosen = (neurons[order] * height + row) * width + column
            new_lower, new_upper = _merge(
                new_lower, new_upper, found, chosen, local.gather(1, order)
            )
    return Box(new_lower.view(interval.lower.shape), new_upper.view(interval.upper.shape))


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _output_spec(problem: Problem) -> Tensor:
    """``C`` as ``(B, K, *S_out)``; the identity on the outputs when no ``C`` was given."""
    net, batch = problem.net, problem.batch
    if problem.spec is not None:
        return problem.spec.view(batch, problem.spec.shape[1], *net.output_shape)
    n_out = _numel(net.output_shape)
    eye = torch.eye(n_out, dtype=problem.box.lower.dtype, device=problem.box.lower.device)
    return eye.expand(batch, n_out, n_out).reshape(batch, n_out, *net.output_shape)


def _reshape_result(problem: Problem, bounds: Box) -> Box:
    if problem.spec is not None:
        return bounds
    shape = (problem.batch, *problem.net.output_shape)
    return Box(bounds.lower.view(shape), bounds.upper.view(shape))


def crown(
    model: nn.Module,
    box: Box,
    C: Tensor | None = None,
    *,
    intermediate: Intermediate = Intermediate.CROWN,
    lower_slope: LowerSlope = LowerSlope.ADAPTIVE,
    upper: bool = True,
) -> Box:
    """Backward linear relaxation bounds on ``C f(x)`` over ``box`` (CROWN; CROWN-IBP with
    ``intermediate=Intermediate.IBP``).

    Differentiable with respect to the model's parameters.

    Args:
        model: any supported model, a chain or a graph (see
            :func:`tightrope.bounds.lower`).
        box: input box ``(B, *S_in)``.
        C: ``(B, K, n_out)`` or ``(K, n_out)`` specification; ``None`` bounds ``f`` itself.
        intermediate: how ReLU pre-activations are bounded: ``Intermediate.CROWN`` (a backward
            pass per layer; tight, cost grows with depth and width) or ``Intermediate.IBP``
            (CROWN-IBP; cheap).
        lower_slope: lower-line slope policy for unstable ReLUs (also used for intermediates).
        upper: compute upper bounds too; with ``False`` the upper bounds are ``+inf`` and the
            output pass costs half (margins only need lower bounds).

    Returns:
        Box ``(B, K)``, or ``(B, *S_out)`` when ``C`` is None.
    """
    problem = prepare(model, box, C)
    if not problem.net.is_relu_chain:
        _check_intermediate(intermediate)
        _, relaxations = graph.graph_pre_activations(
            problem.net, box, intermediate is Intermediate.CROWN, lower_slope)
        bounds = graph.output_bounds(problem.net, box, _output_spec(problem), relaxations, upper)
        return _reshape_result(problem, bounds)
    pre = pre_activation_bounds(problem.net, box, intermediate, lower_slope)
    return _output_bounds(problem, pre, upper)


def crown_ibp(
    model: nn.Module,
    box: Box,
    C: Tensor | None = None,
    *,
    lower_slope: LowerSlope = LowerSlope.ADAPTIVE,
    upper: bool = True,
) -> Box:
    """CROWN-IBP (Zhang et al. 2020): IBP pre-activation bounds, one CROWN pass at the output.

    Same as ``crown(model, box, C, intermediate=Intermediate.IBP, ...)``.
    """
    return crown(model, box, C, intermediate=Intermediate.IBP, lower_slope=lower_slope,
                 upper=upper)


def _output_bounds(problem: Problem, pre: PreActivations, upper: bool) -> Box:
    net, spec = problem.net, _output_spec(problem)
    end = len(net.ops)
    rows = spec.shape[1] * (2 if upper else 1)
    size = _sample_group_size(net, problem.batch, rows, problem.box.lower.device)
    # Every per-sample tensor is split once into the groups (see ReluRelaxation.split).
    lowers, uppers, specs = (
        torch.split(t, size) for t in (problem.box.lower, problem.box.upper, spec)
    )
    relaxations = {i: r.split(size) for i, r in pre.relaxations.items()}
    found = []
    for group, (lower, upper_end, rows_spec) in enumerate(zip(lowers, uppers, specs, strict=True)):
        box = Box(lower, upper_end)
        group_relaxations = {i: parts[group] for i, parts in relaxations.items()}
        if upper:
            found.append(both_sides(net, end, rows_spec, box, group_relaxations))
        else:
            bound = input_lower_bound(net, end, rows_spec, box, group_relaxations)
            found.append(Box(bound, torch.full_like(bound, float("inf"))))
    if len(found) == 1:
        return _reshape_result(problem, found[0])
    bounds = Box(torch.cat([b.lower for b in found]), torch.cat([b.upper for b in found]))
    return _reshape_result(problem, bounds)


#: Upper limit on the elements of one coefficient tensor ``(B, rows, *S)`` of the output pass
#: on CPU; larger batches go through in groups of samples (32 MB in float32). Tensors above glibc's
#: largest mmap threshold are mapped and faulted in afresh on every allocation, and smaller
#: ones stay in cache between the steps of the pass: on CNN7 both are worth more than the
#: larger convolutions lose (``benchmarks/test_bounds_speed.py``). GPUs take the whole batch.
OUTPUT_CHUNK_ELEMENTS = 1 << 23


def _sample_group_size(net: Network, batch: int, rows: int, device: torch.device) -> int:
    """Samples per group of the output pass, so that its coefficients stay under
    ``OUTPUT_CHUNK_ELEMENTS`` (on CPU; the whole batch elsewhere)."""
    if device.type != "cpu":
        return max(1, batch)
    widest = max(_numel(shape) for shape in net.shapes)
    return max(1, OUTPUT_CHUNK_ELEMENTS // max(1, rows * widest))


def linear_bounds(
    model: nn.Module,
    box: Box,
    C: Tensor | None = None,
    *,
    intermediate: Intermediate = Intermediate.CROWN,
    lower_slope: LowerSlope = LowerSlope.ADAPTIVE,
) -> LinearBounds:
    """The linear functions of the input behind ``crown``'s bounds.

    ``lA x + lb <= C f(x) <= uA x + ub`` for every ``x`` in ``box``; ``lA, uA: (B, K, *S_in)``,
    ``lb, ub: (B, K)``. ``linear_bounds(...).concretize(box)`` equals ``crown(...)``.
    """
    problem = prepare(model, box, C)
    net = problem.net
    spec = _output_spec(problem)
    rows = spec.shape[1]
    doubled = torch.cat([spec, -spec], dim=1)
    if net.is_relu_chain:
        pre = pre_activation_bounds(net, box, intermediate, lower_slope)
        A_in, bias = backward_lower(net, len(net.ops), doubled, pre.relaxations)
    else:
        _check_intermediate(intermediate)
        _, relaxations = graph.graph_pre_activations(
            net, box, intermediate is Intermediate.CROWN, lower_slope)
        pending, bias = graph.graph_backward(net, len(net.ops), doubled, relaxations)
        A_in = pending.get(0, box.lower.new_zeros(doubled.shape[:2] + box.lower.shape[1:]))
    return LinearBounds(A_in[:, :rows], bias[:, :rows], -A_in[:, rows:], -bias[:, rows:])
