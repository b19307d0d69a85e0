"""Fused kernels for the elementwise steps of the backward pass (opt-in, ``torch.compile``).

The ReLU step of a backward pass (``relu_step``) reads and writes the whole coefficient tensor
``(B, K, *S)`` several times in eager PyTorch: a clamp, two products, a sum for the constant,
and as many again in its gradient. On CNN7 that traffic was a third of a CROWN-IBP training
step on a 2-core CPU. Compiled by ``torch.compile`` (inductor), the step and its gradient each
read the coefficients once.

Compilation costs seconds per kernel variant (cached on disk by inductor for later
processes), so it is off unless :func:`compile_kernels` turns it on (the command-line tools
do), and even then a variant runs eagerly until it has processed ``after_elements``
coefficients, about as many seconds of eager work as its compilation takes: short runs and
small networks never pay for it. Each variant (number of dimensions, dtype, device, grad mode
and which inputs need gradients) is compiled once, with dynamic shapes, from its own copy of
the function, so no variant evicts another from dynamo's per-function cache. If compiling
fails (no C++ compiler, an unsupported platform), a warning says so once and every later call
runs eagerly.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from tightrope.bounds.core import features_dot

__all__ = ["compile_kernels", "kernels_compiled", "relu_step", "relu_step_eager"]

Step = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]

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
_compiled: dict[tuple[object, ...], Step] = {}
_working: set[tuple[object, ...]] = set()
_processed: dict[tuple[object, ...], int] = {}


def compile_kernels(enabled: bool = True, *, after_elements: int = AFTER_ELEMENTS) -> bool:
    """Run the backward pass's ReLU step as a compiled, fused kernel (``True``) or eagerly.

    Affects every later bound computation of the process (``crown``, ``crown_ibp``,
    ``alpha_crown``, ``linear_bounds``, beta-CROWN). The results are the same function of the
    inputs up to float rounding (the compiled constant sums in another order). On CNN7
    (batch 128, CPU) it takes a fifth off a CROWN-IBP training step.

    Args:
        enabled: compile (True) or always run eagerly (False).
        after_elements: each kernel variant runs eagerly until the coefficient tensors it was
            given add up to this many elements, then compiles (seconds, once per process and
            variant); 0 compiles at first use.

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
    """Whether :func:`relu_step` runs compiled kernels (see :func:`compile_kernels`)."""
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
        out, bias = _run(A, bias, lower_slope, upper_slope, intercept)
        return out.permute(0, 1, 4, 2, 3), bias
    return _run(A, bias, lower_slope, upper_slope, intercept)


def _run(
    A: Tensor, bias: Tensor, lower_slope: Tensor, upper_slope: Tensor, intercept: Tensor
) -> tuple[Tensor, Tensor]:
    inputs = (A, bias, lower_slope, upper_slope, intercept)
    key = (
        A.dim(), A.dtype, A.device.type, torch.is_grad_enabled(),
        tuple(t.requires_grad for t in inputs),
    )
    kernel = _compiled.get(key)
    if kernel is None:
        processed = _processed.get(key, 0)
        if processed < _settings.after:
            _processed[key] = processed + A.numel()
            return relu_step_eager(*inputs)
        # A fresh code object per variant: dynamo keeps its compiled graphs on the code object
        # and stops compiling one function after a few variants.
        code = _relu_step_fusable.__code__.replace(co_name=f"relu_step_{len(_compiled)}")
        function = types.FunctionType(code, _relu_step_fusable.__globals__)
        kernel = _compiled[key] = torch.compile(function, dynamic=True)
    if key in _working:
        return kernel(*inputs)
    try:
        result = kernel(*inputs)
    except Exception as error:
        result = relu_step_eager(*inputs)  # bad inputs raise their own error here
        _settings.failed = True
        warnings.warn(
            f"tightrope.bounds: compiling the fused ReLU step failed ({type(error).__name__}: "
            f"{error}); bound computations run eagerly from now on",
            RuntimeWarning,
            stacklevel=3,
        )
        return result
    _working.add(key)
    return result


def _channels_last(A: Tensor) -> bool:
    """Whether ``A: (B, K, C, H, W)`` is laid out channels-last (as fast transposes leave it)."""
    return A.dim() == 5 and not A.is_contiguous() and A.permute(0, 1, 3, 4, 2).is_contiguous()
