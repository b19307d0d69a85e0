"""Interval bound propagation (Gowal et al. 2018, "On the Effectiveness of Interval Bound
Propagation for Training Verifiably Robust Models").

Intervals travel in centre/radius form: an affine map sends ``(c, r)`` to ``(L c + b, |L| r)``,
ReLU is monotone. The specification ``C`` is folded into the trailing affine block (the layers
after the last ReLU), so the output bound is that of the single affine map ``C f`` rather than
``C`` applied to the output box (tighter; auto_LiRPA does the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tightrope.bounds import graph
from tightrope.bounds.backward import backward_lower
from tightrope.bounds.core import Box
from tightrope.bounds.fused import kernels_compiled, relu_interval, relu_interval_channels_last
from tightrope.bounds.network import Affine, Network, expect_relu
from tightrope.bounds.problem import prepare

__all__ = [
    "IntervalTrace",
    "ibp",
    "ibp_trace",
    "interval_pre_activations",
    "propagate_center_radius",
    "propagate_interval",
    "tail_bounds",
]


def propagate_interval(
    net: Network,
    box: Box,
    start: int = 0,
    end: int | None = None,
    pre_activations: dict[int, Box] | None = None,
) -> Box:
    """Propagate ``box`` (the input of op ``start``) to the output of op ``end - 1``.

    When ``pre_activations`` is given, the input box of every ReLU op is stored in it under the
    op's index, and a box already stored there is intersected in (callers use this to tighten
    intervals with better bounds).
    """
    center, radius = propagate_center_radius(
        net, box.center, box.radius, start, end, pre_activations
    )
    return Box.from_center_radius(center, radius)


def propagate_center_radius(
    net: Network,
    center: Tensor,
    radius: Tensor,
    start: int = 0,
    end: int | None = None,
    pre_activations: dict[int, Box] | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`propagate_interval` on the interval ``center -/+ radius``, returned in the same
    form (no conversion to and from bounds in between)."""
    end = len(net.ops) if end is None else end
    # oneDNN convolves a single-channel image about a third faster in NCHW than channels-last
    # (MNIST's first layer); compiled and without gradients, the first interval ReLU then
    # writes channels-last for the later layers at no extra cost. Otherwise the layout changes
    # here.
    late_layout = (
        pre_activations is None and not torch.is_grad_enabled() and kernels_compiled()
        and _single_channel(center)
    )
    if not late_layout:
        center, radius = _to_channels_last(center), _to_channels_last(radius)
    for index in range(start, end):
        op = net.ops[index]
        if isinstance(op, Affine):
            center, radius = op.apply(center), op.apply_abs(radius)
            continue
        expect_relu(op, "propagate_center_radius")
        if pre_activations is None:
            if late_layout:
                center, radius = relu_interval_channels_last(center, radius)
                late_layout = False
            else:
                center, radius = relu_interval(center, radius)
            continue
        lower, upper = center - radius, center + radius
        known = pre_activations.get(index)
        if known is not None:
            lower, upper = torch.maximum(lower, known.lower), torch.minimum(upper, known.upper)
        pre_activations[index] = Box(lower, upper)
        lower, upper = torch.relu(lower), torch.relu(upper)
        center, radius = (upper + lower).mul_(0.5), (upper - lower).mul_(0.5)
    return center, radius


def _single_channel(images: Tensor) -> bool:
    return images.dim() == 4 and images.shape[1] == 1 and images.device.type == "cpu"


def _to_channels_last(images: Tensor) -> Tensor:
    """Images in channels-last layout, where oneDNN's convolutions run 10-20% faster on CPU;
    every later op keeps the layout, and values and shapes are unchanged.

    A contiguous single-channel batch already has channels-last memory order, but its strides
    do not say so and convolutions would keep the slower layout for every later layer; it
    gets the channels-last strides as a view (no copy).
    """
    if images.dim() != 4 or images.device.type != "cpu":
        return images
    _, channels, height, width = images.shape
    if channels == 1 and images.is_contiguous():
        return images.as_strided(images.shape, (height * width, 1, width, 1))
    return images.contiguous(memory_format=torch.channels_last)


def interval_pre_activations(net: Network, box: Box) -> dict[int, Box]:
    """IBP bounds on the input of every ReLU op, keyed by op index."""
    found: dict[int, Box] = {}
    last_relu = max(net.relu_indices, default=-1)
    propagate_interval(net, box, end=last_relu + 1, pre_activations=found)
    return found


def ibp(model: nn.Module, box: Box, C: Tensor | None = None) -> Box:
    """Interval bounds on ``C f(x)`` (or ``f(x)``) for every ``x`` in ``box``.

    Differentiable with respect to the model's parameters. Costs about two forward passes.

    Args:
        model: any supported model, a chain or a graph (see ``supported_layers()``
            and :func:`tightrope.bounds.lower`).
        box: input box, ``(B, *S_in)``.
        C: ``(B, K, n_out)`` or ``(K, n_out)`` specification, e.g. ``margin_spec(y, n)``.

    Returns:
        Box of shape ``(B, K)`` (or ``(B, *S_out)`` when ``C`` is None).
    """
    problem = prepare(model, box, C)
    net = problem.net
    if not net.is_relu_chain:
        return _graph_ibp(net, box, problem.spec)
    if problem.spec is None:
        return propagate_interval(net, box)
    tail_start = max(net.relu_indices, default=-1) + 1
    center, radius = propagate_center_radius(net, box.center, problem.radius, end=tail_start)
    return tail_bounds(net, problem.spec, center, radius, tail_start)


def _graph_ibp(net: Network, box: Box, spec: Tensor | None) -> Box:
    """:func:`ibp` on a network that is not a chain of affine maps and ReLUs."""
    if spec is not None:
        return graph.tail_interval_bounds(net, box, spec)
    output = graph.graph_interval(net, box)[-1]
    assert output is not None
    return Box.from_center_radius(*output)


@dataclass(frozen=True, slots=True)
class IntervalTrace:
    """The result of :func:`ibp_trace`.

    Attributes:
        output: bounds on ``C f(x)`` (or ``f(x)``), as :func:`ibp` returns them.
        pre_activations: the interval of each ReLU's input, in network order, each
            ``(B, *S_i)``; BatchNorm is folded into the preceding layer, so these are the
            post-BatchNorm pre-activations.
    """

    output: Box
    pre_activations: tuple[Box, ...]


def ibp_trace(model: nn.Module, box: Box, C: Tensor | None = None) -> IntervalTrace:
    """:func:`ibp` that also returns the pre-activation intervals it passed through.

    For training terms that look inside the network, e.g. the tightness and ReLU-balance
    regularisers of Shi et al. 2021 ("Fast Certified Robust Training with Short Warmup").
    Same arguments, cost (plus one copy of each ReLU's bounds) and differentiability as
    :func:`ibp`.
    """
    problem = prepare(model, box, C)
    net = problem.net
    found: dict[int, Box] = {}
    if not net.is_relu_chain:
        graph.graph_interval(net, box, found=found)
        relus = tuple(found[i] for i in net.relu_indices)
        return IntervalTrace(_graph_ibp(net, box, problem.spec), relus)
    tail_start = max(net.relu_indices, default=-1) + 1
    center, radius = propagate_center_radius(
        net, box.center, problem.radius, end=tail_start, pre_activations=found
    )
    if problem.spec is None:
        center, radius = propagate_center_radius(net, center, radius, start=tail_start)
        output = Box.from_center_radius(center, radius)
    else:
        output = tail_bounds(net, problem.spec, center, radius, tail_start)
    return IntervalTrace(output, tuple(found[index] for index in sorted(found)))


def tail_bounds(
    net: Network, C: Tensor, center: Tensor, radius: Tensor, tail_start: int
) -> Box:
    """Bounds of ``C f`` given the interval ``center -/+ radius`` of the input of the trailing
    affine block.

    ``C f`` is one affine map ``A z + b`` of the block's input ``z`` (``A = C L``), bounded by
    ``A c + b -/+ |A| r``. Margin specifications repeat across a batch (one ``C`` per label), so
    ``A`` is built once per distinct ``C``. On CPU the centre takes one product with the
    block's map ``L`` and the samples are grouped by specification for one batched product
    ``|A| r`` (see ``_grouped_bounds``), reading the centre and radius in their own memory
    order (a channels-last tensor is not copied to be flattened).
    Elsewhere the centre is the block's plain forward pass (``C f(c)`` costs less than
    ``(C L) c`` applied to every sample) and the per-sample ``(B, K, n)`` tensor is only formed
    when the specifications are all distinct.
    """
    batch, rows = C.shape[0], C.shape[1]
    distinct, which = _distinct_specs(C)
    if distinct.shape[0] < batch and radius.device.type == "cpu":
        return _grouped_bounds(net, C, distinct, which, center, radius, tail_start)
    A, _ = backward_lower(
        net, len(net.ops), distinct.view(distinct.shape[0], rows, *net.output_shape), {},
        start=tail_start,
    )
    radius = radius.flatten(1)
    out = center
    for op in net.ops[tail_start:]:
        assert isinstance(op, Affine)
        out = op.apply(out)
    mid = torch.bmm(C, out.reshape(batch, -1, 1)).squeeze(-1)
    A = A.flatten(2)
    if distinct.shape[0] == batch:
        spread = torch.bmm(A.abs(), radius.unsqueeze(-1)).squeeze(-1)
    else:
        # (B, n) @ (n, U K) -> (B, U, K), then each sample picks its own specification.
        pick = which.view(batch, 1, 1).expand(batch, 1, rows)
        spread = (radius @ A.abs().flatten(0, 1).T).view(batch, -1, rows).gather(1, pick)
        spread = spread.squeeze(1)
    return Box(mid - spread, mid + spread)


def _memory_order(A: Tensor, center: Tensor, radius: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``A: (U, K, n)``, ``center, radius: (B, n)``: the features flattened in the memory order
    of a channels-last ``center`` (a view of it; ``A``, small, is permuted to match), else in
    the logical order."""
    if (center.dim() == 4 and not center.is_contiguous()
            and center.permute(0, 2, 3, 1).is_contiguous()):
        center, radius = center.permute(0, 2, 3, 1), radius.permute(0, 2, 3, 1)
        A = A.permute(0, 1, 3, 4, 2)
    return A.flatten(2), center.flatten(1), radius.flatten(1)


def _grouped_bounds(net: Network, C: Tensor, distinct: Tensor, which: Tensor, center: Tensor,
                    radius: Tensor, tail_start: int) -> Box:
    """:func:`tail_bounds` for specifications ``C = distinct[which]``, ``distinct: (U, K, n_out)``
    with ``U < B``, on the CPU.

    The block's linear map ``L`` (``n_out`` rows) and constant ``f(0)`` come from one backward
    pass, in the memory order of the centre: the centre then takes one product,
    ``C (L c + f(0))``, and ``|A| r`` with ``A = C L`` one per specification (see
    ``_per_specification``).
    """
    rows = distinct.shape[1]
    n_out = distinct.shape[2]
    identity = torch.eye(n_out, dtype=center.dtype, device=center.device)
    L, offset = backward_lower(
        net, len(net.ops), identity.view(1, n_out, *net.output_shape), {}, start=tail_start
    )
    L, center, radius = _memory_order(L, center, radius)
    L = L[0]
    # (n_out, n) @ (n, B): with few outputs, about 3x faster on CPU than the same product
    # taken as (B, n) @ (n, n_out).
    outputs = torch.addmm(offset[0].unsqueeze(1), L, center.T)
    mid = torch.bmm(C, outputs.T.unsqueeze(-1)).squeeze(-1)
    A = (distinct.flatten(0, 1) @ L).view(distinct.shape[0], rows, -1)
    spread = _per_specification(A.abs(), radius, which)
    return Box(mid - spread, mid + spread)


def _per_specification(A: Tensor, radius: Tensor, which: Tensor) -> Tensor:
    """``A_{which[b]} r_b`` for ``A: (U, K, n)`` and ``r: (B, n)`` -> ``(B, K)``.

    The samples are gathered by specification into equal chunks, padded by repeating a sample
    whose results are dropped, and one batched matrix product serves every chunk: a U-th of
    the arithmetic of applying every specification to every sample, without the per-call cost
    of one small product per group. A chunk holds a whole group (the largest) when that pads
    the batch to at most twice its rows, as with balanced labels; otherwise ``ceil(B / U)``
    samples, a large group taking several, which also keeps the rows under about twice the
    batch however skewed the labels are.
    """
    groups, rows = A.shape[0], A.shape[1]
    batch, device = which.shape[0], which.device
    order = torch.argsort(which, stable=True)
    counts = torch.bincount(which, minlength=groups)
    starts = torch.cumsum(counts, 0) - counts
    # Sample b is the rank[b]-th of its group in sorted order.
    rank = torch.empty_like(order)
    rank[order] = torch.arange(batch, device=device) - starts[which[order]]
    largest = int(counts.max())
    width = largest if groups * largest <= 2 * batch else -(-batch // groups)
    if width == largest:  # one chunk per group
        first, last = starts, starts + counts - 1
        position = which * width + rank
    else:
        chunks = (counts + width - 1) // width
        first_chunk = torch.cumsum(chunks, 0) - chunks
        chunk_group = torch.repeat_interleave(torch.arange(groups, device=device), chunks)
        within = torch.arange(chunk_group.shape[0], device=device) - first_chunk[chunk_group]
        first = starts[chunk_group] + within * width
        last = starts[chunk_group] + counts[chunk_group] - 1
        position = (first_chunk[which] + rank // width) * width + rank % width
        A = A.index_select(0, chunk_group)
    # slots[c, i]: the i-th sample of chunk c (its group's last sample past the group's end).
    offsets = torch.arange(width, device=device)
    slots = order[torch.minimum(first.unsqueeze(1) + offsets, last.unsqueeze(1))].flatten()
    gathered = radius.index_select(0, slots).view(-1, width, radius.shape[1])
    products = torch.bmm(A, gathered.transpose(1, 2))
    return products.transpose(1, 2).reshape(-1, rows).index_select(0, position)


#: Above this many distinct specifications, applying each to every sample costs more than
#: forming the per-sample coefficients.
_MAX_SHARED_SPECS = 32


_KEY_WEIGHTS: dict[tuple[int, torch.device], Tensor] = {}


def _key_weights(size: int, device: torch.device) -> Tensor:
    """A fixed generic vector (square roots of evenly spaced numbers in [1, 2]), made once per
    size and device."""
    found = _KEY_WEIGHTS.get((size, device))
    if found is None:
        found = torch.linspace(1.0, 2.0, size, dtype=torch.float64, device=device).sqrt()
        _KEY_WEIGHTS[(size, device)] = found
    return found


def _distinct_specs(C: Tensor) -> tuple[Tensor, Tensor]:
    """``(distinct, which)`` with ``C[b] == distinct[which[b]]``; ``C`` itself when the rows
    are (nearly) all different or ``C`` carries gradients."""
    batch = C.shape[0]
    identity = torch.arange(batch, device=C.device)
    if batch <= 1 or C.requires_grad:
        return C, identity
    flat = C.flatten(1)
    # One number per specification (a fixed generic projection) finds the candidates fast;
    # the exact check below makes a collision harmless.
    keys = torch.mv(flat.to(torch.float64), _key_weights(flat.shape[1], C.device))
    _, which = torch.unique(keys, return_inverse=True)
    count = int(which.max()) + 1
    if count > _MAX_SHARED_SPECS or 2 * count > batch:
        return C, identity
    first = torch.full((count,), batch, dtype=torch.long, device=C.device)
    first = first.scatter_reduce(0, which, identity, reduce="amin")
    distinct = C[first]
    if not torch.equal(distinct[which], C):
        return C, identity
    return distinct, which
