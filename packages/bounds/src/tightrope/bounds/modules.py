"""Modules the bound rules understand beyond ``torch.nn``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["Add", "Concat", "Elementwise", "Normalize", "Pad", "Permute", "Reshape"]


class Normalize(nn.Module):
    """Per-channel input normalisation ``(x - mean) / std`` as a model's first layer.

    Tightrope keeps inputs in pixel space ``[0, 1]`` so that eps and the input box are in pixel
    units; normalisation belongs to the model. ``mean`` and ``std`` hold one value per channel
    (dimension 1 of the input).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.get_default_dtype()).flatten()
        std_t = torch.as_tensor(std, dtype=torch.get_default_dtype()).flatten()
        if mean_t.shape != std_t.shape:
            raise ValueError(f"mean and std need one value per channel each, got "
                             f"{mean_t.numel()} and {std_t.numel()}")
        if bool((std_t <= 0).any()):
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        return t.view(1, -1, *([1] * (x.dim() - 2))).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self._view(self.mean, x)) / self._view(self.std, x)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


class Add(nn.Module):
    """The sum of two tensors of the same shape: a residual connection's join, ``a + b``."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


class Concat(nn.Module):
    """Tensors joined along per-sample dimension ``dim`` (``dim`` 0 is the first dimension
    after the batch)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 0:
            raise ValueError(f"Concat needs a non-negative per-sample dimension, got {dim}")
        self.dim = dim

    def forward(self, *parts: Tensor) -> Tensor:
        return torch.cat(parts, dim=self.dim + 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Reshape(nn.Module):
    """Each sample reshaped to ``shape`` (row-major order, as ``torch.reshape``)."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if any(s <= 0 for s in self.shape):
            raise ValueError(f"Reshape needs a per-sample shape of positive sizes, got "
                             f"{self.shape}")

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class Permute(nn.Module):
    """Each sample's dimensions reordered: output dimension ``i`` is input dimension
    ``dims[i]`` (per-sample dimensions, counted from 0 after the batch)."""

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.dims = tuple(int(d) for d in dims)
        if sorted(self.dims) != list(range(len(self.dims))):
            raise ValueError(f"Permute needs a permutation of 0..{len(self.dims) - 1}, got "
                             f"{self.dims}")

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, *(d + 1 for d in self.dims))

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


class Pad(nn.Module):
    """Constant padding of the last per-sample dimensions, ``pads`` as ``torch.nn.functional.pad``
    takes them (last dimension first: ``(left, right, top, bottom, ...)``); non-negative."""

    def __init__(self, pads: Sequence[int], value: float = 0.0) -> None:
        super().__init__()
        self.pads = tuple(int(p) for p in pads)
        if len(self.pads) % 2 or any(p < 0 for p in self.pads):
            raise ValueError(f"Pad needs pairs of non-negative sizes, got {self.pads}")
        self.value = float(value)

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.pad(x, self.pads, value=self.value)

    def extra_repr(self) -> str:
        return f"pads={self.pads}, value={self.value}"


class Elementwise(nn.Module):
    """An elementwise affine map ``x * scale + shift`` with constant ``scale`` and ``shift``
    broadcast against each sample's shape (e.g. ``(C, 1, 1)`` per channel, or the full shape)."""

    scale: Tensor
    shift: Tensor

    def __init__(self, scale: Tensor | float, shift: Tensor | float = 0.0) -> None:
        super().__init__()
        # Tensors keep their dtype (float64 constants stay exact until the model is cast).
        scale_t = scale if isinstance(scale, Tensor) else torch.tensor(
            scale, dtype=torch.get_default_dtype())
        shift_t = shift if isinstance(shift, Tensor) else torch.tensor(
            shift, dtype=torch.get_default_dtype())
        self.register_buffer("scale", scale_t.clone())
        self.register_buffer("shift", shift_t.clone())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)

    def extra_repr(self) -> str:
        return f"scale={tuple(self.scale.shape)}, shift={tuple(self.shift.shape)}"
