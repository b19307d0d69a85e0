"""Core value types: boxes, linear bounds, specifications and the lower-slope policy.

Everything here is an immutable value. Shapes use ``B`` for the batch, ``K`` for specification
rows and ``*S`` for one sample's feature shape.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Box", "LinearBounds", "LowerSlope", "margin_spec"]


class LowerSlope(enum.Enum):
    """How ``crown`` picks the lower slope ``a`` of an unstable ReLU (see ``relaxation``)."""

    #: CROWN (Zhang et al. 2018): ``a = 1`` if ``u >= -l`` else ``0``, the choice of smaller area.
    ADAPTIVE = "adaptive"
    #: ``a = 0`` everywhere.
    ZERO = "zero"
    #: ``a = 1`` everywhere.
    ONE = "one"
    #: ``a = u / (u - l)``, parallel to the upper chord: the dual network of Wong & Kolter 2018
    #: and Fast-Lin (Weng et al. 2018).
    PARALLEL = "parallel"


@dataclass(frozen=True, slots=True)
class Box:
    """An elementwise interval ``lower <= z <= upper``; both tensors have shape ``(B, *S)``."""

    lower: Tensor
    upper: Tensor

    def __post_init__(self) -> None:
        if self.lower.shape != self.upper.shape:
            raise ValueError(
                f"Box bounds must have one shape, got lower {tuple(self.lower.shape)} "
                f"and upper {tuple(self.upper.shape)}"
            )

    @classmethod
    def from_linf(
        cls,
        x: Tensor,
        eps: float | Tensor,
        domain: tuple[float, float] | None = (0.0, 1.0),
    ) -> Box:
        """The l_inf ball of radius ``eps`` around ``x``, intersected with ``domain``.

        Args:
            x: ``(B, *S)`` centre points, e.g. images in ``[0, 1]``.
            eps: radius; a float, or a tensor broadcastable to ``x`` (e.g. ``(B, 1, 1, 1)``
                for one radius per sample).
            domain: ``(low, high)`` clip of the input domain, or ``None`` for no clip.
        """
        eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
        if bool((eps_t < 0).any()):
            raise ValueError(f"eps must be non-negative, got {eps}")
        lower, upper = x - eps_t, x + eps_t
        if domain is not None:
            low, high = domain
            if low > high:
                raise ValueError(f"domain must be (low, high) with low <= high, got {domain}")
            lower, upper = lower.clamp(low, high), upper.clamp(low, high)
        return cls(lower, upper)

    @classmethod
    def from_center_radius(cls, center: Tensor, radius: Tensor) -> Box:
        """The box ``[center - radius, center + radius]``."""
        return cls(center - radius, center + radius)

    @property
    def center(self) -> Tensor:
        """``(lower + upper) / 2``, shape ``(B, *S)``."""
        return (self.lower + self.upper) / 2

    @property
    def radius(self) -> Tensor:
        """``(upper - lower) / 2``, shape ``(B, *S)``; non-negative for a valid box."""
        return (self.upper - self.lower) / 2

    @property
    def shape(self) -> torch.Size:
        return self.lower.shape

    def contains(self, z: Tensor, tolerance: float = 0.0) -> Tensor:
        """Per-element test ``lower - tol <= z <= upper + tol`` (broadcast against ``z``)."""
        return (z >= self.lower - tolerance) & (z <= self.upper + tolerance)

    def intersect(self, other: Box) -> Box:
        """The elementwise intersection with another sound box of the same quantity."""
        return Box(torch.maximum(self.lower, other.lower), torch.minimum(self.upper, other.upper))


@dataclass(frozen=True, slots=True)
class LinearBounds:
    """Linear functions of the input that bound ``C f(x)`` on an input box.

    ``lA x + lb <= C f(x) <= uA x + ub`` for every ``x`` in the box the bounds were computed on,
    where ``lA, uA: (B, K, *S_in)`` and ``lb, ub: (B, K)``.
    """

    lA: Tensor
    lb: Tensor
    uA: Tensor
    ub: Tensor

    def concretize(self, box: Box) -> Box:
        """The tightest constant bounds of these linear functions over ``box``: ``(B, K)``."""
        return Box(
            concretize_lower(self.lA, self.lb, box),
            -concretize_lower(-self.uA, -self.ub, box),
        )


def concretize_lower(A: Tensor, bias: Tensor, box: Box) -> Tensor:
    """``min over x in box of A x + bias`` for ``A: (B, K, *S)``, ``bias: (B, K)`` -> ``(B, K)``.

    Hölder's inequality on the l_inf box: ``A c - |A| r + bias``.
    """
    return features_dot(A, box.center) - features_dot(A.abs(), box.radius) + bias


def features_dot(A: Tensor, v: Tensor) -> Tensor:
    """``sum over features of A[b, k] * v[b]`` for ``A: (B, K, *S)`` and ``v: (B or 1, *S)``.

    Reads ``A`` in its own memory order (channels-last coefficients stay uncopied).
    """
    if A.dim() == 5 and not A.is_contiguous():
        channels_last = A.permute(0, 1, 3, 4, 2)
        if channels_last.is_contiguous():
            A, v = channels_last, v.permute(0, 2, 3, 1)
    flat = A.reshape(A.shape[0], A.shape[1], -1)
    vector = v.reshape(v.shape[0], -1)
    if vector.shape[0] == 1:
        return flat @ vector[0]
    return torch.bmm(flat, vector.unsqueeze(-1)).squeeze(-1)


def margin_spec(y: Tensor, num_classes: int, dtype: torch.dtype | None = None) -> Tensor:
    """The margin specification ``C: (B, K-1, K)`` with rows ``e_y - e_j`` for every ``j != y``.

    A sample is verified when the lower bound of every row of ``C f(x)`` is positive.

    Args:
        y: ``(B,)`` integer labels in ``[0, num_classes)``.
        num_classes: number of classes ``K >= 2``.
        dtype: floating dtype of ``C`` (default: torch's default dtype); bound functions cast
            ``C`` to the model's dtype anyway.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if y.dim() != 1:
        raise ValueError(f"y must have shape (B,), got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")
    eye = torch.eye(num_classes, device=y.device, dtype=dtype)
    # others[b] lists the K-1 classes j != y[b] in increasing order.
    classes = torch.arange(num_classes, device=y.device).expand(y.shape[0], num_classes)
    others = classes[classes != y.unsqueeze(1)].view(y.shape[0], num_classes - 1)
    return eye[y].unsqueeze(1) - eye[others]
