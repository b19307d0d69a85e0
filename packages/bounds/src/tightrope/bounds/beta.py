"""beta-CROWN: linear bounds on branch-and-bound subdomains with ReLU split constraints.

A *subdomain* of an input box fixes the phase of some ReLUs: ``z_j >= 0`` (active, sign
``+1``) or ``z_j <= 0`` (inactive, sign ``-1``). Wang et al. 2021 ("Beta-CROWN: Efficient Bound
Propagation with Per-neuron Split Constraints for Complete and Incomplete Neural Network
Robustness Verification") carry these constraints into the backward pass with Lagrange
multipliers ``beta >= 0``: for every point of the subdomain ``s_j z_j >= 0``, so

    f(x) >= f(x) - sum_j beta_j s_j z_j

and any lower bound of the right-hand side over the *relaxed* network is a lower bound of ``f``
on the subdomain. In the backward pass the term ``-beta_j s_j`` joins the coefficient of the
pre-activation ``z_j`` right after its ReLU's relaxation step. Split neurons are also clamped
(active: ``l >= 0``; inactive: ``u <= 0``), which makes their relaxation exact. Any
``beta >= 0`` and any lower slope ``alpha`` in ``[0, 1]`` is sound, so both are optimised by
projected gradient ascent (Adam), as in alpha-CROWN (Xu et al. 2021).

Everything here works on a lowered :class:`~tightrope.bounds.network.Network` with a batch of
subdomains ``D`` stacked along the leading dimension, so a branch-and-bound search can bound
hundreds of subdomains in one call. Shapes: ``S_i`` is the per-sample shape of ReLU op ``i``'s
pre-activation, ``K`` the number of specification rows.

A chain of affine maps and ReLUs takes the specialised chain pass; any other graph (residual
joins, max pooling) takes the graph backward pass (:func:`~tightrope.bounds.graph.graph_backward`),
where the split term rides on the ReLU's relaxation
(:class:`~tightrope.bounds.relaxation.SplitReluRelaxation`) and the pre-activation boxes of
every relaxed op (max pooling too) are given; only ReLUs are split. Per-neuron refinement after
a split (:func:`refine_pre_activations`) takes chains only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from tightrope.bounds.backward import relu_step
from tightrope.bounds.certificate import dual_lower
from tightrope.bounds.core import Box, concretize_lower, features_dot
from tightrope.bounds.graph import Relaxation, box_relaxations, graph_backward
from tightrope.bounds.linear import _tighten
from tightrope.bounds.network import Affine, Network, expect_relu, transpose_rows
from tightrope.bounds.relaxation import (
    LowerSlope,
    ReluRelaxation,
    SplitReluRelaxation,
    relu_relaxation,
)

__all__ = [
    "SplitBound",
    "apply_splits",
    "certified_split_bound",
    "empty_subdomains",
    "optimise_pre_activations",
    "optimise_split_bound",
    "refine_pre_activations",
    "split_lower_bound",
]


@dataclass(frozen=True, slots=True)
class SplitBound:
    """The result of a bound on ``D`` subdomains.

    Attributes:
        lower: ``(D, K)`` lower bounds of ``C f(x)`` over each subdomain.
        input_coefficients: ``(D, K, *S_in)``: the bound is ``min`` over the input box of
            ``input_coefficients . x + constant``; its minimiser is a counterexample candidate.
        relu_coefficients: per ReLU op, ``(D, K, *S_i)``: the coefficients of the ReLU *outputs*
            met by the backward pass (branching heuristics read them).
        alphas: per ReLU op, the lower slopes used, ``(D, K, *S_i)``.
        betas: per ReLU op, the split multipliers used, ``(D, K, *S_i)`` (zero off splits).
        pre_coefficients: per ReLU op, ``(D, K, *S_i)``: the coefficients of the ReLU *inputs*
            after the relaxation and split terms, the Lagrange multipliers that
            :func:`tightrope.bounds.dual_lower` evaluates rigorously.
    """

    lower: Tensor
    input_coefficients: Tensor
    relu_coefficients: dict[int, Tensor]
    alphas: dict[int, Tensor]
    betas: dict[int, Tensor]
    pre_coefficients: dict[int, Tensor]


def apply_splits(boxes: Mapping[int, Box], signs: Mapping[int, Tensor]) -> dict[int, Box]:
    """Clamp pre-activation ``boxes`` ``(D, *S_i)`` to the split ``signs`` ``(D, *S_i)``.

    Sign ``+1`` (active) raises the lower bound to ``0``, ``-1`` (inactive) lowers the upper
    bound to ``0``, ``0`` leaves the neuron alone. A clamped box with ``lower > upper`` means
    the subdomain is empty (see :func:`empty_subdomains`).
    """
    clamped: dict[int, Box] = {}
    for index, box in boxes.items():
        sign = signs.get(index)
        if sign is None:
            clamped[index] = box
            continue
        lower = torch.where(sign > 0, box.lower.clamp(min=0), box.lower)
        upper = torch.where(sign < 0, box.upper.clamp(max=0), box.upper)
        clamped[index] = Box(lower, upper)
    return clamped


def empty_subdomains(boxes: Mapping[int, Box]) -> Tensor:
    """``(D,)`` booleans: subdomains whose (clamped) pre-activation bounds cross somewhere."""
    empty: Tensor | None = None
    for box in boxes.values():
        crossed = (box.lower > box.upper).flatten(1).any(dim=1)
        empty = crossed if empty is None else empty | crossed
    if empty is None:
        raise ValueError("empty_subdomains needs at least one pre-activation box")
    return empty


def refine_pre_activations(
    net: Network,
    box: Box,
    boxes: Mapping[int, Box],
    signs: Mapping[int, Tensor],
    start_layer: int = 0,
) -> dict[int, Box]:
    """Tighten the pre-activation bounds of ReLU layers after a split by CROWN passes.

    Each ReLU op whose position in ``net.relu_indices`` is above ``start_layer`` gets CROWN
    bounds on its still-unstable neurons through the split-clamped relaxations of the layers
    before it (Zhang et al. 2018), intersected with the given bounds (which stay sound on a
    subdomain, Wang et al. 2021). The split multipliers are not used here.

    Args:
        net: the lowered network.
        box: input boxes ``(D, *S_in)``, one per subdomain.
        boxes: known pre-activation bounds ``(D, *S_i)`` per ReLU op (e.g. the parent's).
        signs: split signs ``(D, *S_i)`` per ReLU op.
        start_layer: position (in ``net.relu_indices``) of the shallowest layer split since
            ``boxes`` were computed; layers up to it keep their bounds.

    Returns:
        Clamped bounds for every ReLU op.
    """
    net.require_chain("refine_pre_activations")
    refined = apply_splits(boxes, signs)
    relaxations: dict[int, ReluRelaxation] = {}
    for position, index in enumerate(net.relu_indices):
        if position > start_layer:
            tightened = _tighten(net, index, box, refined[index], relaxations)
            refined[index] = apply_splits({index: tightened}, signs)[index]
        relaxations[index] = relu_relaxation(refined[index], LowerSlope.ADAPTIVE)
    return refined


def optimise_pre_activations(
    net: Network,
    box: Box,
    boxes: Mapping[int, Box],
    signs: Mapping[int, Tensor] | None = None,
    *,
    steps: int = 20,
    lr_alpha: float = 0.1,
    deadline: float | None = None,
    search: Network | None = None,
) -> dict[int, Box]:
    """Tighten pre-activation bounds layer by layer with optimised lower slopes.

    alpha-CROWN (Xu et al. 2021) applied to the intermediate layers: the unstable neurons of
    each ReLU layer (the union over the batch) are bounded from both sides as specification
    rows of the network cut before that layer, with slopes optimised per row, through the
    already-tightened layers before it; results are intersected with ``boxes``. Costs ``steps``
    backward passes per layer, with two rows per unstable neuron.

    Args:
        net: the lowered network.
        box: input boxes ``(D, *S_in)`` (or ``(1, *S_in)`` shared by all ``D`` subdomains).
        boxes: sound pre-activation bounds ``(D, *S_i)`` per ReLU op (e.g. CROWN's).
        signs: optional split phases ``(D, *S_i)``; bounds are clamped to them.
        deadline: ``time.monotonic()`` value after which the ascent steps stop (the bounds
            found so far are kept; they are sound at every step).
        search: when given, the ascent runs on this lowering of the same model (e.g. in
            float32) and each layer's bounds are the rigorous dual bounds
            (:func:`~tightrope.bounds.dual_lower`) in ``net``'s dtype at the multipliers found:
            valid in exact arithmetic when ``boxes`` are. ``None``: plain alpha-CROWN in
            ``net``'s dtype, sound up to its rounding.
    """
    signs = {} if signs is None else signs
    refined = apply_splits(boxes, signs)
    for index in net.relu_indices:
        value = net.op_inputs[index][0]
        earlier = {i: b for i, b in refined.items() if i < value}
        if not earlier:
            continue  # no relaxed op before it: CROWN is already exact on the affine prefix
        current = refined[index]
        batch = current.lower.shape[0]
        lower, upper = current.lower.flatten(1), current.upper.flatten(1)
        union = ((lower < 0) & (upper > 0)).any(dim=0).nonzero().squeeze(1)
        count = int(union.numel())
        if count == 0:
            continue
        prefix = net.prefix(value)
        selector = lower.new_zeros((batch, 2 * count, lower.shape[1]))
        rows = torch.arange(count, device=lower.device)
        selector[:, rows, union] = 1.0
        selector[:, rows + count, union] = -1.0
        earlier_signs = {i: s for i, s in signs.items() if i < value}
        rows_c = selector.view(batch, 2 * count, *net.shapes[value])
        if search is None:
            found = optimise_split_bound(
                prefix, box, rows_c, earlier, earlier_signs, steps=steps, lr_alpha=lr_alpha,
                deadline=deadline,
            )
            found_rows = found.lower.detach()
        else:
            search_prefix = search.prefix(value)
            _, found_rows = certified_split_bound(
                prefix, box, rows_c, earlier, earlier_signs, search=search_prefix,
                steps=steps, lr_alpha=lr_alpha, deadline=deadline,
            )
        new_lower, new_upper = lower.clone(), upper.clone()
        new_lower[:, union] = torch.maximum(lower[:, union], found_rows[:, :count])
        new_upper[:, union] = torch.minimum(upper[:, union], -found_rows[:, count:])
        shape = current.lower.shape
        tightened = Box(new_lower.view(shape), new_upper.view(shape))
        refined[index] = apply_splits({index: tightened}, signs)[index]
    return refined


def split_lower_bound(
    net: Network,
    box: Box,
    C: Tensor,
    boxes: Mapping[int, Box],
    signs: Mapping[int, Tensor],
    alphas: Mapping[int, Tensor] | None = None,
    betas: Mapping[int, Tensor] | None = None,
    relaxations: Mapping[int, Relaxation] | None = None,
) -> SplitBound:
    """Lower bounds of ``C f(x)`` on ``D`` subdomains (beta-CROWN, Wang et al. 2021).

    Sound for every ``alpha`` in ``[0, 1]`` and ``beta >= 0`` (values outside are clamped),
    provided ``boxes`` bound the pre-activations of every point of each subdomain.

    Args:
        net: the lowered network.
        box: input boxes ``(D, *S_in)``.
        C: ``(D, K, *net.output_shape)`` specification rows.
        boxes: pre-activation bounds ``(D, *S_i)`` per ReLU op, already clamped by
            :func:`apply_splits`.
        signs: split signs ``(D, *S_i)`` (int, values in ``{-1, 0, 1}``) per ReLU op.
        alphas: lower slopes ``(D, K or 1, *S_i)`` per ReLU op (default: CROWN's adaptive
            choice); only unstable neurons read them.
        betas: multipliers ``(D, K or 1, *S_i)`` per ReLU op (default: zero); only split
            neurons read them.
        relaxations: :func:`~tightrope.bounds.graph.box_relaxations` of ``boxes`` when
            already at hand (an ascent bounds the same boxes at every step).
    """
    if relaxations is None:
        relaxations = box_relaxations(net, boxes)
    if not net.is_relu_chain:
        return _graph_split_lower_bound(net, box, C, boxes, signs, alphas, betas, relaxations)
    batch, rows = C.shape[0], C.shape[1]
    A = C
    bias = C.new_zeros((batch, rows))
    relu_coefficients: dict[int, Tensor] = {}
    used_alphas: dict[int, Tensor] = {}
    used_betas: dict[int, Tensor] = {}
    pre_coefficients: dict[int, Tensor] = {}
    for index in range(len(net.ops) - 1, -1, -1):
        op = net.ops[index]
        if isinstance(op, Affine):
            bias = bias + features_dot(A, net.offset(index))
            A = transpose_rows(op, A.flatten(0, 1), net.shapes[index]).view(
                batch, rows, *net.shapes[index]
            )
            continue
        expect_relu(op, "split_lower_bound")
        relaxation = relaxations[index]
        assert isinstance(relaxation, ReluRelaxation)
        relu_coefficients[index] = A
        unstable = relaxation.unstable.unsqueeze(1)
        fixed = relaxation.lower_slope.unsqueeze(1)
        if alphas is not None and index in alphas:
            slope = torch.where(unstable, alphas[index].clamp(0.0, 1.0), fixed)
        else:
            slope = fixed
        used_alphas[index] = slope
        A, bias = relu_step(A, bias, slope, relaxation.upper_slope, relaxation.upper_intercept)
        sign = signs.get(index)
        if sign is not None and betas is not None and index in betas:
            multiplier = betas[index].clamp(min=0.0) * (sign != 0).unsqueeze(1)
            used_betas[index] = multiplier
            A = A - multiplier * sign.unsqueeze(1).to(A.dtype)
        pre_coefficients[index] = A
    lower = concretize_lower(A, bias, box)
    return SplitBound(lower, A, relu_coefficients, used_alphas, used_betas, pre_coefficients)


def _graph_split_lower_bound(
    net: Network,
    box: Box,
    C: Tensor,
    boxes: Mapping[int, Box],
    signs: Mapping[int, Tensor],
    alphas: Mapping[int, Tensor] | None,
    betas: Mapping[int, Tensor] | None,
    base: Mapping[int, Relaxation],
) -> SplitBound:
    """:func:`split_lower_bound` on a graph: one graph backward pass whose ReLU relaxations
    carry the chosen slopes and split terms (``boxes`` hold every relaxed op's input box,
    ``base`` their relaxations)."""
    relaxations: dict[int, Relaxation] = dict(base)
    used_alphas: dict[int, Tensor] = {}
    used_betas: dict[int, Tensor] = {}
    for index in boxes:
        relaxation = base[index]
        if not isinstance(relaxation, ReluRelaxation):
            continue
        fixed = relaxation.lower_slope.unsqueeze(1)
        slope = fixed
        if alphas is not None and index in alphas:
            slope = torch.where(relaxation.unstable.unsqueeze(1), alphas[index].clamp(0.0, 1.0),
                                fixed)
        used_alphas[index] = slope
        parts = (slope, relaxation.upper_slope, relaxation.upper_intercept, relaxation.unstable)
        sign = signs.get(index)
        if sign is not None and betas is not None and index in betas:
            multiplier = betas[index].clamp(min=0.0) * (sign != 0).unsqueeze(1)
            used_betas[index] = multiplier
            relaxations[index] = SplitReluRelaxation(
                *parts, multiplier * sign.unsqueeze(1).to(multiplier.dtype))
        else:
            relaxations[index] = ReluRelaxation(*parts)
    record: dict[int, tuple[Tensor, list[Tensor]]] = {}
    pending, bias = graph_backward(net, len(net.ops), C, relaxations, record=record)
    batch, rows = C.shape[0], C.shape[1]
    A = pending.get(0)
    if A is None:  # the output does not depend on the input
        A = C.new_zeros((batch, rows, *net.input_shape))
    relu_coefficients: dict[int, Tensor] = {}
    pre_coefficients: dict[int, Tensor] = {}
    for index in net.relu_indices:
        seen = record.get(index)
        if seen is None:  # a ReLU no path to the output reads
            seen = (C.new_zeros((batch, rows, *net.shapes[index + 1])),
                    [C.new_zeros((batch, rows, *net.in_shape(index)))])
        relu_coefficients[index], pre_coefficients[index] = seen[0], seen[1][0]
    lower = concretize_lower(A, bias, box)
    return SplitBound(lower, A, relu_coefficients, used_alphas, used_betas, pre_coefficients)


def optimise_split_bound(
    net: Network,
    box: Box,
    C: Tensor,
    boxes: Mapping[int, Box],
    signs: Mapping[int, Tensor],
    alphas: Mapping[int, Tensor] | None = None,
    betas: Mapping[int, Tensor] | None = None,
    *,
    steps: int = 20,
    lr_alpha: float = 0.1,
    lr_beta: float = 0.05,
    objective: Tensor | None = None,
    deadline: float | None = None,
) -> SplitBound:
    """:func:`split_lower_bound` with ``alpha`` and ``beta`` optimised jointly (Wang et al. 2021).

    Projected Adam ascent on the sum of the bounds (or of ``objective``-weighted bounds); every
    row keeps the multipliers of the best bound it has seen, so the result is never looser than
    the starting point. Missing ``alphas`` start at CROWN's slopes, missing ``betas`` at zero.

    Args:
        objective: optional ``(D, K)`` weights of the rows in the ascent objective (e.g. to
            favour the row a subdomain's verdict depends on).
        deadline: ``time.monotonic()`` value after which no further step is taken (the best
            bound so far is returned).

    Returns:
        The best bound per row, with the multipliers and coefficients that produced it (the
        coefficients come from one final pass at the best multipliers).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    batch, rows = C.shape[0], C.shape[1]
    relaxations = box_relaxations(net, boxes)
    free_alpha: dict[int, Tensor] = {}
    free_beta: dict[int, Tensor] = {}
    for index, relaxation in relaxations.items():
        if not isinstance(relaxation, ReluRelaxation):
            continue  # max pooling (on a graph): no free parameters
        shape = (batch, rows, *relaxation.lower_slope.shape[1:])
        start = alphas.get(index) if alphas is not None else None
        if start is None:
            start = relaxation.lower_slope.unsqueeze(1)
        free_alpha[index] = start.detach().expand(shape).clone()
        if index in signs:
            start_beta = betas.get(index) if betas is not None else None
            free_beta[index] = (
                C.new_zeros(shape) if start_beta is None else start_beta.detach().expand(shape)
            ).clone()
    C = C.detach()
    if steps == 0:
        return split_lower_bound(net, box, C, boxes, signs, free_alpha, free_beta, relaxations)
    parameters = [*free_alpha.values(), *free_beta.values()]
    rates = [lr_alpha] * len(free_alpha) + [lr_beta] * len(free_beta)
    for parameter in parameters:
        parameter.requires_grad_(True)
    adam = _Adam(parameters, rates)
    best = torch.full((batch, rows), float("-inf"), dtype=C.dtype, device=C.device)
    best_alpha = {i: a.detach().clone() for i, a in free_alpha.items()}
    best_beta = {i: b.detach().clone() for i, b in free_beta.items()}
    weights = objective.detach() if objective is not None else None
    for step in range(steps + 1):
        with torch.enable_grad():
            found = split_lower_bound(net, box, C, boxes, signs, free_alpha, free_beta,
                                      relaxations)
            value = found.lower.detach()
            improved = value > best
            best = torch.where(improved, value, best)
            for store, current in ((best_alpha, free_alpha), (best_beta, free_beta)):
                for index, tensor in current.items():
                    mask = improved.view(batch, rows, *([1] * (tensor.dim() - 2)))
                    store[index] = torch.where(mask, tensor.detach(), store[index])
            if step == steps or (deadline is not None and time.monotonic() > deadline):
                break
            total = found.lower if weights is None else found.lower * weights
            gradients = torch.autograd.grad(
                -total.sum(), parameters, allow_unused=True, materialize_grads=True
            )
        with torch.no_grad():
            adam.step(gradients)
            for tensor in free_alpha.values():
                tensor.clamp_(0.0, 1.0)
            for tensor in free_beta.values():
                tensor.clamp_(min=0.0)
    with torch.no_grad():
        return split_lower_bound(net, box, C, boxes, signs, best_alpha, best_beta, relaxations)


def certified_split_bound(
    net: Network,
    box: Box,
    C: Tensor,
    boxes: Mapping[int, Box],
    signs: Mapping[int, Tensor],
    alphas: Mapping[int, Tensor] | None = None,
    betas: Mapping[int, Tensor] | None = None,
    *,
    search: Network | None = None,
    steps: int = 20,
    lr_alpha: float = 0.1,
    lr_beta: float = 0.05,
    objective: Tensor | None = None,
    deadline: float | None = None,
    offsets: Tensor | None = None,
) -> tuple[SplitBound, Tensor]:
    """:func:`optimise_split_bound` on ``search`` (a lowering of the same model, e.g. in
    float32; ``net`` itself when ``None``), then the rigorous dual bound at the multipliers it
    found, in ``net``'s dtype (:func:`~tightrope.bounds.dual_lower`).

    ``box``, ``C`` and ``boxes`` are in ``net``'s dtype, the boxes valid in exact arithmetic
    (widened, :meth:`~tightrope.bounds.Rounding.widen`); ``alphas`` and ``betas`` in
    ``search``'s. Returns the search's bound (its multipliers and coefficients, in ``search``'s
    dtype) and the sound lower bounds ``(D, K)`` of ``C f(x) - offsets`` (``-inf`` wherever
    NaN or overflow occurred).
    """
    search = net if search is None else search
    dtype = search.like.dtype
    found = optimise_split_bound(
        search, Box(box.lower.to(dtype), box.upper.to(dtype)), C.to(dtype),
        {i: Box(b.lower.to(dtype), b.upper.to(dtype)) for i, b in boxes.items()}, signs,
        alphas, betas, steps=steps, lr_alpha=lr_alpha, lr_beta=lr_beta, objective=objective,
        deadline=deadline,
    )
    exact = net.like.dtype
    multipliers = {i: m.detach().to(exact) for i, m in found.pre_coefficients.items()}
    return found, dual_lower(net, box, C, boxes, multipliers, offsets)


class _Adam:
    """Adam (Kingma & Ba 2015) on a few tensors, in place, without ``torch.optim``.

    ``torch.optim`` imports the compiler stack on first use (seconds of start-up), which a
    verifier answering one instance per process cannot afford.
    """

    def __init__(self, parameters: list[Tensor], rates: list[float],
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.parameters = parameters
        self.rates = rates
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.first = [torch.zeros_like(p) for p in parameters]
        self.second = [torch.zeros_like(p) for p in parameters]
        self.count = 0

    def step(self, gradients: tuple[Tensor, ...]) -> None:
        """One descent step along ``gradients`` (of the loss to minimise); no autograd."""
        self.count += 1
        correction1 = 1 - self.beta1**self.count
        correction2 = 1 - self.beta2**self.count
        for parameter, gradient, first, second, rate in zip(
            self.parameters, gradients, self.first, self.second, self.rates, strict=True
        ):
            first.mul_(self.beta1).add_(gradient, alpha=1 - self.beta1)
            second.mul_(self.beta2).addcmul_(gradient, gradient, value=1 - self.beta2)
            denominator = (second / correction2).sqrt_().add_(self.eps)
            parameter.addcdiv_(first, denominator, value=-rate / correction1)
