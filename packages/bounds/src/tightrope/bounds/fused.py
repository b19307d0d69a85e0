"""Fused kernels for the elementwise steps of bound propagation (opt-in, ``torch.compile``).

The ReLU step of a backward pass (``relu_step``) reads and writes the whole coefficient tensor
``(B, K, *S)`` several times in eager PyTorch: a clamp, two products, a sum for the constant,
and as many again in its gradient. On CNN7 that traffic was a third of a CROWN-IBP training
step on a 2-core CPU. Compiled by ``torch.compile`` (inductor), the step and its gradient each
read the coefficients once. IBP's interval ReLU (``relu_interval``) is four passes over the
centre and radius in eager PyTorch (seven with gradients, and as many in their backward) and
one compiled (one more for the gradient, which recomputes the ReLU masks from the saved inputs).
The ReLU relaxation built from pre-activation bounds (``relu_relaxation``: slopes and
intercept) is a dozen passes over the bounds eagerly, and as many again under autograd; it has
closed-form gradients in any mode, and one compiled pass each way.

Compilation costs seconds per kernel variant (cached on disk by inductor for later
processes), so it is off unless :func:`compile_kernels` turns it on (the command-line tools
do), and even then a variant runs eagerly until it has processed ``after_elements``
elements, about as many seconds of eager work as its compilation takes: short runs and
small networks never pay for it. Each variant (kernel, number of dimensions, dtype, device,
grad mode and which inputs need gradients) is compiled once, with dynamic shapes, from its own
copy of the function, so no variant evicts another from dynamo's per-function cache. If
compiling fails (no C++ compiler, an unsupported platform), a warning says so once and every
later call runs eagerly.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from tightrope.bounds.core import LowerSlope, features_dot

__all__ = [
    "compile_kernels",
    "kernels_compiled",
    "relu_interval",
    "relu_interval_channels_last",
    "relu_interval_eager",
    "relu_relaxation",
    "relu_relaxation_eager",
    "relu_step",
    "relu_step_eager",
]

Result = TypeVar("Result")

#: Default of ``compile_kernels(after_elements=...)``: on a 2-core CPU, about 10 s of eager
#: ReLU steps with gradients, the order of one variant's compilation.
AFTER_ELEMENTS = 1 << 30



class _Settings:
    __slots__ = ("after", "enabled", "failed")

    def __init__(self) -> None:
        self.enabled = False
        self.failed = False
        self.after = AFTER_ELEMENTS


_settings = _Settings()
_compiled: dict[tuple[object, ...], Callable[..., Any]] = {}
_working: set[tuple[object, ...]] = set()
_processed: dict[tuple[object, ...], int] = {}


def compile_kernels(enabled: bool = True, *, after_elements: int = AFTER_ELEMENTS) -> bool:
    """Run the backward pass's ReLU step, IBP's interval ReLU and the ReLU relaxation as
    compiled, fused kernels (``True``) or eagerly.

    Affects every later bound computation of the process (``ibp``, ``crown``, ``crown_ibp``,
    ``alpha_crown``, ``linear_bounds``, beta-CROWN). The results are the same function of the
    inputs up to float rounding (the compiled constant sums in another order). On CNN7
    (batch 128, CPU) it takes a fifth off a CROWN-IBP training step.

    Args:
        enabled: compile (True) or always run eagerly (False).
        after_elements: each kernel variant runs eagerly until the tensors it was given
            (coefficients, interval centres or bounds) add up to this many elements, then compiles
            (seconds, once per process and variant); 0 compiles at first use.

    Returns:
        whether compiled kernels are now in use: False when turned off, when ``torch.compile``
        is missing, or after a compilation failed in this process.
    """
    if after_elements < 0:
        raise ValueError(f"after_elements must be >= 0, got {after_elements}")
    _settings.enabled = enabled
    _settings.after = after_elements
    _processed.clear()
    return kernels_compiled()


def kernels_compiled() -> bool:
    """Whether :func:`relu_step` and :func:`relu_interval` run compiled kernels (see
    :func:`compile_kernels`)."""
    return _settings.enabled and not _settings.failed and hasattr(torch, "compile")


def relu_step_eager(
    A: Tensor, bias: Tensor, lower_slope: Tensor, upper_slope: Tensor, intercept: Tensor
) -> tuple[Tensor, Tensor]:
    """One ReLU of the backward pass: ``A: (B, K, *S)``, ``bias: (B, K)``,
    ``lower_slope: (B, 1 or K, *S)``, ``upper_slope, intercept: (B, *S)``.

    Where a coefficient is negative the upper line keeps the bound a lower bound:
    ``A' = A * lower_slope + A- * (upper_slope - lower_slope)``, constant ``+= A- . intercept``.
    """
    negative = A.clamp(max=0)
    bias = bias + features_dot(negative, intercept)
    return torch.addcmul(A * lower_slope, negative, upper_slope.unsqueeze(1) - lower_slope), bias


def _relu_step_fusable(
    A: Tensor, bias: Tensor, lower_slope: Tensor, upper_slope: Tensor, intercept: Tensor
) -> tuple[Tensor, Tensor]:
    # relu_step_eager with the constant as an elementwise product and a sum (not a batched
    # matrix product), which inductor fuses with the rest of the step and of its gradient.
    negative = A.clamp(max=0)
    bias = bias + (negative * intercept.unsqueeze(1)).sum(dim=tuple(range(2, A.dim())))
    return torch.addcmul(A * lower_slope, negative, upper_slope.unsqueeze(1) - lower_slope), bias


def relu_step(
    A: Tensor, bias: Tensor, lower_slope: Tensor, upper_slope: Tensor, intercept: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`relu_step_eager`, compiled when :func:`compile_kernels` is on."""
    if not kernels_compiled():
        return relu_step_eager(A, bias, lower_slope, upper_slope, intercept)
    if _channels_last(A):
        # The kernels run on the memory order of A: (B, K, H, W, C), contiguous.
        A, lower_slope = A.permute(0, 1, 3, 4, 2), lower_slope.permute(0, 1, 3, 4, 2)
        upper_slope, intercept = upper_slope.permute(0, 2, 3, 1), intercept.permute(0, 2, 3, 1)
        out, bias = _run(relu_step_eager, _relu_step_fusable,
                         (A, bias, lower_slope, upper_slope, intercept))
        return out.permute(0, 1, 4, 2, 3), bias
    return _run(relu_step_eager, _relu_step_fusable, (A, bias, lower_slope, upper_slope, intercept))


def relu_interval_eager(center: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    """``relu`` of the interval ``center -/+ radius`` in centre/radius form.

    Without gradients: with ``u = relu(c + r)`` the new radius is ``r`` where the neuron is
    active (``c >= r``), ``u / 2`` where it is unstable and ``0`` where it is off:
    ``min(u / 2, r)``; the new centre is ``u`` minus it (four passes). With gradients: the
    half-sum and half-difference of ``relu(c + r)`` and ``relu(c - r)``, whose backward is two
    cheap ReLU masks (that of ``minimum`` is not).
    """
    if torch.is_grad_enabled() and (center.requires_grad or radius.requires_grad):
        upper = (center + radius).relu_()  # fresh temporaries: in place is safe under autograd
        lower = (center - radius).relu_()
        radius = (upper - lower).mul_(0.5)
        return lower + radius, radius
    upper = (center + radius).relu_()
    radius = torch.minimum(upper * 0.5, radius)
    return upper - radius, radius


def _relu_interval_fusable(center: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    # relu_interval_eager without gradients, out of place (inductor fuses it into one pass).
    upper = torch.relu(center + radius)
    radius = torch.minimum(upper * 0.5, radius)
    return upper - radius, radius


def _channels_last_pair(center: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    return (center.contiguous(memory_format=torch.channels_last),
            radius.contiguous(memory_format=torch.channels_last))


def _relu_interval_channels_last_eager(center: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    return _channels_last_pair(*relu_interval_eager(center, radius))


def _relu_interval_channels_last_fusable(center: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    # _relu_interval_fusable writing its results channels-last: in the fused kernel the
    # change of layout costs nothing measurable.
    return _channels_last_pair(*_relu_interval_fusable(center, radius))


def _relu_interval_differentiable(center: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    # relu_interval_eager's values with gradients, out of place (one fused pass); compiled
    # without gradients as the forward of _IntervalRelu.
    upper = torch.relu(center + radius)
    lower = torch.relu(center - radius)
    radius = (upper - lower) * 0.5
    return lower + radius, radius


def _relu_interval_backward(
    center: Tensor, radius: Tensor, grad_center: Tensor, grad_radius: Tensor
) -> tuple[Tensor, Tensor]:
    # The gradients of _relu_interval_differentiable in (center, radius), from its inputs:
    # half the sum of the output gradients reaches relu(c + r), half their difference
    # relu(c - r), each where its argument is positive (torch's ReLU gradient at 0 is 0).
    through_upper = torch.where(center + radius > 0, (grad_center + grad_radius) * 0.5, 0.0)
    through_lower = torch.where(center - radius > 0, (grad_center - grad_radius) * 0.5, 0.0)
    return through_upper + through_lower, through_upper - through_lower


class _IntervalRelu(torch.autograd.Function):
    """The interval ReLU with gradients as two compiled passes: the forward saves its inputs and
    the backward recomputes the ReLU masks from them.

    Compiling the differentiable function whole makes autograd's partitioner save the two
    masks as boolean tensors, and inductor's boolean stores ran about ten times slower than
    the rest of the kernel on a 2-core AVX2 CPU (torch 2.13): the interval ReLU then cost more
    than eager PyTorch. Saving the inputs keeps as much memory as eager PyTorch does (two
    tensors of the ReLU's size).
    """

    @staticmethod
    def forward(ctx: Any, center: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(center, radius)
        return _run(_relu_interval_differentiable, _relu_interval_differentiable,
                    (center.detach(), radius.detach()))

    @staticmethod
    def backward(ctx: Any, grad_center: Tensor, grad_radius: Tensor) -> tuple[Tensor, Tensor]:
        center, radius = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the eager formula, differentiable in the incoming gradients.
            return _relu_interval_backward(center, radius, grad_center, grad_radius)
        return _run(_relu_interval_backward, _relu_interval_backward,
                    (center.detach(), radius.detach(), grad_center.contiguous(),
                     grad_radius.contiguous()))


def relu_interval(center: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`relu_interval_eager` (IBP's ReLU step), compiled when :func:`compile_kernels` is
    on; ``center`` and ``radius`` have the same shape."""
    if not kernels_compiled():
        return relu_interval_eager(center, radius)
    layout = _dense_order(center)
    if layout is None or center.shape != radius.shape or radius.stride() != center.stride():
        return relu_interval_eager(center, radius)
    grad = torch.is_grad_enabled() and (center.requires_grad or radius.requires_grad)
    # One pass over the memory of both tensors, whatever their layout (channels-last too).
    shape = [center.shape[d] for d in layout]
    flat_center = center.permute(layout).reshape(-1)
    flat_radius = radius.permute(layout).reshape(-1)
    if grad:
        out_center, out_radius = _IntervalRelu.apply(  # type: ignore[no-untyped-call]
            flat_center, flat_radius
        )
    else:
        out_center, out_radius = _run(
            relu_interval_eager, _relu_interval_fusable, (flat_center, flat_radius)
        )
    back = [layout.index(d) for d in range(center.dim())]
    return out_center.view(shape).permute(back), out_radius.view(shape).permute(back)


def relu_interval_channels_last(center: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`relu_interval` of images ``(B, C, H, W)``, the results in channels-last layout
    whatever the inputs' layout: compiled and without gradients, the fused kernel changes the
    layout as it writes; otherwise a copy does. Other tensors go to :func:`relu_interval`."""
    if center.dim() != 4:
        return relu_interval(center, radius)
    if torch.is_grad_enabled() and (center.requires_grad or radius.requires_grad):
        return _channels_last_pair(*relu_interval(center, radius))
    if not kernels_compiled():
        return _relu_interval_channels_last_eager(center, radius)
    return _run(_relu_interval_channels_last_eager, _relu_interval_channels_last_fusable,
                (center, radius))


Relaxation = tuple[Tensor, Tensor, Tensor, Tensor]

def relu_relaxation_eager(lower: Tensor, upper: Tensor, policy: LowerSlope) -> Relaxation:
    """The linear relaxation of ``relu`` on ``[lower, upper]`` (same shapes), without gradients:
    ``(lower_slope, upper_slope, upper_intercept, unstable)`` (see ``relaxation.relu_relaxation``).

    Stable neurons are exact (``active = lower >= 0``: slopes 1; otherwise 0, no intercept);
    unstable ones (``lower < 0 < upper``) get the chord ``s = u / (u - l)``, ``t = -s l`` and the
    lower slope of ``policy``: ``ADAPTIVE`` (``u >= -l``), ``ZERO``, ``ONE`` or ``PARALLEL``
    (``s``).
    """
    return (*_relu_lines(lower, upper, policy), _unstable(lower, upper))


def _unstable(lower: Tensor, upper: Tensor) -> Tensor:
    return (lower < 0) & (upper > 0)


def _relu_lines(
    lower: Tensor, upper: Tensor, policy: LowerSlope
) -> tuple[Tensor, Tensor, Tensor]:
    # The three lines of relu_relaxation_eager. Compiled on its own: inductor's stores of
    # boolean tensors (the unstable mask) made the fused kernel four times slower on CPU
    # (torch 2.13), more than the mask costs eagerly.
    unstable = _unstable(lower, upper)
    active = (lower >= 0).to(upper.dtype)
    # The chord's division is masked where it is not used (u - l may be 0 there).
    chord = torch.where(unstable, upper / (upper - lower), active)
    intercept = torch.where(unstable, -chord * lower, 0.0)
    if policy is LowerSlope.ADAPTIVE:
        slope = torch.where(unstable, (upper >= -lower).to(upper.dtype), active)
    elif policy is LowerSlope.ZERO:
        slope = torch.where(unstable, 0.0, active)
    elif policy is LowerSlope.ONE:
        slope = torch.where(unstable, 1.0, active)
    elif policy is LowerSlope.PARALLEL:
        slope = chord
    else:
        raise TypeError(f"policy must be a LowerSlope, got {policy!r}")
    return slope, chord, intercept


def _relu_lines_fusable(
    lower: Tensor, upper: Tensor, policy: LowerSlope
) -> tuple[Tensor, Tensor, Tensor]:
    return _relu_lines(lower, upper, policy)


def _relu_relaxation_backward(
    lower: Tensor, upper: Tensor, grad_chord: Tensor, grad_intercept: Tensor
) -> tuple[Tensor, Tensor]:
    # The gradients in (lower, upper) of the unstable neurons' chord s = u / w and intercept
    # t = -s l, with w = u - l: ds/dl = u / w^2, ds/du = -l / w^2, dt/dl = -u^2 / w^2,
    # dt/du = l^2 / w^2; stable neurons have constant lines. (A PARALLEL lower slope is the
    # chord again: its gradient arrives added to grad_chord.)
    unstable = _unstable(lower, upper)
    width = torch.where(unstable, upper - lower, 1.0)
    scale = torch.where(unstable, 1.0 / (width * width), 0.0)
    grad_lower = scale * upper * (grad_chord - upper * grad_intercept)
    grad_upper = -scale * lower * (grad_chord - lower * grad_intercept)
    return grad_lower, grad_upper


def _in_memory_order(
    eager: Callable[..., Result], fusable: Callable[..., Result], inputs: tuple[Tensor, ...],
    options: tuple[object, ...] = (),
) -> Result:
    """An elementwise kernel run through :func:`_run` on its inputs flattened in the memory
    order of the first (one variant for every shape and layout), its tensor results viewed
    back. Other inputs in another layout are copied to that of the first; when the first is not
    dense or the shapes differ, the kernel runs eagerly on the tensors as they are."""
    first = inputs[0]
    layout = _dense_order(first)
    if layout is None or any(t.shape != first.shape for t in inputs[1:]):
        return eager(*inputs, *options)
    inputs = tuple(t if t.stride() == first.stride() else torch.empty_like(first).copy_(t)
                   for t in inputs)
    shape = [first.shape[d] for d in layout]
    back = [layout.index(d) for d in range(first.dim())]
    flat = tuple(t.permute(layout).reshape(-1) for t in inputs)
    results = _run(eager, fusable, flat, options)
    assert isinstance(results, tuple)
    return tuple(r.view(shape).permute(back) for r in results)  # type: ignore[return-value]


class _ReluRelaxation(torch.autograd.Function):
    """The relaxation with gradients as two passes: the forward saves the bounds and the backward
    applies the closed-form derivatives of the chord and intercept to them. (Compiled, this took
    a CROWN-IBP training step on CNN7, batch 128, 2-core CPU, from 7.00 s to 6.36 s, the
    relaxation's forward from 0.28 s to 0.10 s.)"""

    @staticmethod
    def forward(ctx: Any, lower: Tensor, upper: Tensor, policy: LowerSlope) -> Relaxation:
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(lower, upper)
        ctx.policy = policy
        slope, chord, intercept, unstable = _relaxation_values(lower.detach(), upper.detach(),
                                                               policy)
        ctx.mark_non_differentiable(unstable)
        if policy is not LowerSlope.PARALLEL:
            ctx.mark_non_differentiable(slope)
        else:
            slope = slope.clone()  # a separate output (it is the chord's tensor)
        return slope, chord, intercept, unstable

    @staticmethod
    def backward(
        ctx: Any, grad_slope: Tensor | None, grad_chord: Tensor | None,
        grad_intercept: Tensor | None, grad_unstable: Tensor | None,
    ) -> tuple[Tensor | None, Tensor | None, None]:
        lower, upper = ctx.saved_tensors
        if ctx.policy is LowerSlope.PARALLEL and grad_slope is not None:
            grad_chord = grad_slope if grad_chord is None else grad_chord + grad_slope
        if grad_chord is None and grad_intercept is None:
            return None, None, None
        grad_chord = torch.zeros_like(lower) if grad_chord is None else grad_chord
        grad_intercept = torch.zeros_like(lower) if grad_intercept is None else grad_intercept
        if torch.is_grad_enabled() or not kernels_compiled():
            # Under create_graph=True the eager formula is differentiable in everything it reads.
            grad_lower, grad_upper = _relu_relaxation_backward(lower, upper, grad_chord,
                                                               grad_intercept)
        else:
            grad_lower, grad_upper = _in_memory_order(
                _relu_relaxation_backward, _relu_relaxation_backward,
                (lower.detach(), upper.detach(), grad_chord, grad_intercept))
        return grad_lower, grad_upper, None


def _relaxation_values(lower: Tensor, upper: Tensor, policy: LowerSlope) -> Relaxation:
    if not kernels_compiled():
        return relu_relaxation_eager(lower, upper, policy)
    lines = _in_memory_order(_relu_lines, _relu_lines_fusable, (lower, upper), (policy,))
    return (*lines, _unstable(lower, upper))


def relu_relaxation(lower: Tensor, upper: Tensor, policy: LowerSlope) -> Relaxation:
    """:func:`relu_relaxation_eager`, differentiable in ``lower`` and ``upper`` (closed-form
    gradients), compiled when :func:`compile_kernels` is on."""
    if not isinstance(policy, LowerSlope):
        raise TypeError(f"policy must be a LowerSlope (e.g. LowerSlope.ADAPTIVE), got {policy!r}")
    if torch.is_grad_enabled() and (lower.requires_grad or upper.requires_grad):
        result: Relaxation = _ReluRelaxation.apply(  # type: ignore[no-untyped-call]
            lower, upper, policy)
        return result
    return _relaxation_values(lower, upper, policy)


def _dense_order(tensor: Tensor) -> list[int] | None:
    """The dimension order in which ``tensor`` is contiguous (outermost first), or ``None`` when
    it is not a dense, non-overlapping block of memory."""
    strides = tensor.stride()
    order = sorted(range(tensor.dim()), key=lambda d: -strides[d])
    return order if tensor.permute(order).is_contiguous() else None


def _run(
    eager: Callable[..., Result], fusable: Callable[..., Result], inputs: tuple[Tensor, ...],
    options: tuple[object, ...] = (),
) -> Result:
    """``fusable(*inputs, *options)`` compiled for this variant of the inputs, or
    ``eager(*inputs, *options)`` until the variant has seen enough elements (or when compiling
    failed). ``options`` are constants of the variant (part of its key)."""
    key = (
        fusable.__name__, inputs[0].dim(), inputs[0].dtype, inputs[0].device.type,
        torch.is_grad_enabled(), tuple(t.requires_grad for t in inputs), options,
    )
    kernel = _compiled.get(key)
    if kernel is None:
        processed = _processed.get(key, 0)
        if processed < _settings.after:
            _processed[key] = processed + inputs[0].numel()
            return eager(*inputs, *options)
        # A fresh code object per variant: dynamo keeps its compiled graphs on the code object
        # and stops compiling one function after a few variants.
        code = fusable.__code__.replace(co_name=f"{fusable.__name__[1:]}_{len(_compiled)}")
        function = types.FunctionType(code, fusable.__globals__)
        kernel = _compiled[key] = torch.compile(function, dynamic=True)
    if key in _working:
        return kernel(*inputs, *options)  # type: ignore[no-any-return]
    try:
        result = kernel(*inputs, *options)
    except Exception as error:
        result = eager(*inputs, *options)  # bad inputs raise their own error here
        _settings.failed = True
        warnings.warn(
            f"tightrope.bounds: compiling a fused kernel ({fusable.__name__[1:]}) failed "
            f"({type(error).__name__}: {error}); bound computations run eagerly from now on",
            RuntimeWarning,
            stacklevel=3,
        )
        return result
    _working.add(key)
    return result  # type: ignore[no-any-return]


def _channels_last(A: Tensor) -> bool:
    """Whether ``A: (B, K, C, H, W)`` is laid out channels-last (as fast transposes leave it)."""
    return A.dim() == 5 and not A.is_contiguous() and A.permute(0, 1, 3, 4, 2).is_contiguous()
