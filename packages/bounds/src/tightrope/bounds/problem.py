"""Argument checking and lowering shared by every bound function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

from torch import Tensor, nn

from tightrope.bounds.core import Box
from tightrope.bounds.network import Network, lower, uses_batch_statistics

__all__ = ["Problem", "prepare"]


@dataclass(frozen=True, slots=True)
class Problem:
    """A lowered network, its input box and the specification ``C: (B, K, n_out)`` (or None).

    ``radius`` is ``box.radius``, computed once by the argument check.
    """

    net: Network
    box: Box
    spec: Tensor | None
    radius: Tensor

    @property
    def batch(self) -> int:
        return int(self.box.lower.shape[0])


def prepare(model: nn.Module, box: Box, C: Tensor | None) -> Problem:
    """Check the arguments of a bound function and lower the model.

    ``C`` may be ``(B, K, n_out)``, or ``(K, n_out)`` for one specification shared by the batch.
    """
    if not isinstance(box, Box):
        raise TypeError(f"box must be a tightrope.bounds.Box, got {type(box).__name__}; "
                        "build one with Box.from_linf(x, eps)")
    if box.lower.dim() < 2:
        raise ValueError(f"box bounds need a batch dimension: (B, *S), got {tuple(box.shape)}")
    if not box.lower.is_floating_point():
        raise TypeError(f"box bounds must be floating point, got {box.lower.dtype}")
    # The radius is needed anyway; NaN anywhere makes its minimum NaN and fails the check too.
    radius = box.radius
    if radius.numel() and not bool(radius.min() >= 0):
        raise ValueError("box has lower > upper or NaN somewhere; build it from finite "
                         "values with lower <= upper (Box.from_linf does)")
    _check_tensors(model, box.lower)
    # The clean forward pass fixes shapes; BatchNorm on batch statistics needs the whole batch,
    # anything else only the shapes, which an empty batch gives without arithmetic.
    batch_statistics = any(uses_batch_statistics(m) for m in model.modules())
    net = lower(model, box.center if batch_statistics else box.lower[:0])
    n_out = 1
    for size in net.output_shape:
        n_out *= size
    spec = None
    if C is not None:
        if C.dim() == 2:
            C = C.unsqueeze(0).expand(box.lower.shape[0], *C.shape)
        if C.dim() != 3 or C.shape[0] != box.lower.shape[0] or C.shape[2] != n_out:
            raise ValueError(
                f"C must have shape (B, K, n_out) = ({box.lower.shape[0]}, K, {n_out}) "
                f"or (K, {n_out}), got {tuple(C.shape)}"
            )
        spec = C.to(dtype=box.lower.dtype, device=box.lower.device)
    return Problem(net=net, box=box, spec=spec, radius=radius)


def _check_tensors(model: nn.Module, like: Tensor) -> None:
    """Raise when a floating-point parameter or buffer of ``model`` differs from ``like`` in
    dtype or device (read from the modules' own tables: named_parameters costs more than the
    check itself on small networks; it only runs to name the tensor in the error)."""
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            if any(t is not None and _differs(t, like) for t in table.values()):
                _raise_mismatch(model, like)


def _differs(tensor: Tensor, like: Tensor) -> bool:
    return tensor.is_floating_point() and (tensor.dtype != like.dtype
                                           or tensor.device != like.device)


def _raise_mismatch(model: nn.Module, like: Tensor) -> NoReturn:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if _differs(tensor, like):
            raise TypeError(
                f"model tensor {name} is {tensor.dtype} on {tensor.device} but the box is "
                f"{like.dtype} on {like.device}; move the model or the box with .to()"
            )
    raise AssertionError("a mismatched tensor of the model was not found by name")
