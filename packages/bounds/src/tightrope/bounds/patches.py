"""CROWN's intermediate passes on convolutional graphs, row by row on receptive fields.

A row of an intermediate pass selects one pre-activation pixel; carried back through
convolutions it only ever touches that pixel's receptive field. Here every row keeps its
coefficients on a window of the image: all rows of a pass share the window's size and each
has its own top-left pixel (``corner``, which may lie outside the image), so the whole pass
still runs batched, as auto_LiRPA's patches mode does. A convolution's transpose turns a
window of size ``h`` with corner ``p`` into one of size ``(h - 1) s + k`` with corner
``p s - padding``; coefficients that land outside the image (on zero padding) are masked; a
ReLU reads its relaxation on each row's window; a join passes the window to both branches; a
value that several ops read sums their windows on the smallest window holding both. At the
input the box is read on each row's window.

It applies when every op the pass reaches is a convolution, a per-channel affine map, a ReLU
or a join (:func:`patchable`); the dense pass of :mod:`.graph` handles the rest. Its results
equal the dense pass's up to rounding (tested).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tightrope.bounds.core import Box
from tightrope.bounds.network import Add, Affine, Network, Relu
from tightrope.bounds.relaxation import ReluRelaxation

__all__ = ["patch_bound", "patchable"]


@dataclass
class _Rows:
    """Coefficients ``A: (B, R, C, h, w)`` on windows of one value; ``corner: (R, 2)``."""

    A: Tensor
    corner: Tensor


def _ancestors(net: Network, value: int) -> set[int]:
    """The ops a backward pass from ``value`` reaches."""
    found: set[int] = set()
    stack = [value]
    inputs = net.op_inputs
    while stack:
        v = stack.pop()
        if v == 0 or v - 1 in found:
            continue
        found.add(v - 1)
        stack.extend(inputs[v - 1])
    return found


#: Windows pay off while they stay small: a pass from a deep value, whose receptive field
#: (plus the margins of the rows at the image's edges) covers most of each image on the way
#: back, runs dense. Patches when the coefficients of one row, summed over the pass, are at
#: most this share of the dense pass's.
MAX_SHARE = 0.2


def patchable(net: Network, value: int, relaxations: Mapping[int, object]) -> bool:
    """Whether a pass from ``value`` should run on windows: image values all the way back,
    only convolutions, per-channel maps, ReLUs and joins on the way, and a pass of one row on
    windows moving at most ``MAX_SHARE`` of the coefficients of the dense pass."""
    if not _windowable(net, value):
        return False
    channels, height, width = net.shapes[value]
    like = net.like.new_zeros((1, 1, channels, 1, 1))
    corner = torch.tensor([[height // 2, width // 2]], device=net.like.device)
    sizes: list[int] = []
    _final_rows(net, value, _Rows(like, corner), relaxations, sizes=sizes)
    dense = sum(math.prod(net.in_shape(i)) for i in _ancestors(net, value))
    return sum(sizes) <= MAX_SHARE * dense


def _windowable(net: Network, value: int) -> bool:
    for index in _ancestors(net, value):
        op = net.ops[index]
        if len(net.shapes[index + 1]) != 3 or len(net.in_shape(index)) != 3:
            return False
        if isinstance(op, Affine):
            if op.patch_transpose is None and not (op.channelwise and op.fast_transpose):
                return False
        elif not isinstance(op, (Relu, Add)):
            return False
    return True


def _windows(t: Tensor, corner: Tensor, size: tuple[int, int]) -> Tensor:
    """``t: (B, C, H, W)`` read on the window of size ``size`` at each corner, zero outside
    the image: ``(B, R, C, h, w)``."""
    height, width = size
    top = max(0, -int(corner[:, 0].min()))
    left = max(0, -int(corner[:, 1].min()))
    bottom = max(0, int(corner[:, 0].max()) + height - t.shape[2])
    right = max(0, int(corner[:, 1].max()) + width - t.shape[3])
    padded = F.pad(t, (left, right, top, bottom))
    rows = (corner[:, 0] + top).view(-1, 1) + torch.arange(height, device=t.device)
    columns = (corner[:, 1] + left).view(-1, 1) + torch.arange(width, device=t.device)
    found = padded[:, :, rows.view(-1, height, 1), columns.view(-1, 1, width)]  # (B, C, R, h, w)
    return found.permute(0, 2, 1, 3, 4)


def _inside(shape: tuple[int, ...], corner: Tensor, size: tuple[int, int],
            like: Tensor) -> Tensor:
    """``(1, R, 1, h, w)``: 1 where a window pixel lies in the image of ``shape``."""
    ones = like.new_ones((1, 1, shape[1], shape[2]))
    return _windows(ones, corner, size)


def _union(first: _Rows, second: _Rows) -> _Rows:
    """The sum of two sets of rows on one value, on the smallest windows holding both (their
    corners differ by the same offset in every row)."""
    offset = second.corner - first.corner
    dy, dx = int(offset[0, 0]), int(offset[0, 1])
    if not bool((offset == offset[0]).all()):
        raise RuntimeError("rows of one value whose windows are not aligned")
    h1, w1 = first.A.shape[-2:]
    h2, w2 = second.A.shape[-2:]
    top, left = min(0, dy), min(0, dx)
    height, width = max(h1, dy + h2) - top, max(w1, dx + w2) - left

    def placed(rows: Tensor, y: int, x: int) -> Tensor:
        h, w = rows.shape[-2:]
        return F.pad(rows, (x - left, width - (x - left) - w, y - top, height - (y - top) - h))

    total = placed(first.A, 0, 0) + placed(second.A, dy, dx)
    corner = first.corner + torch.tensor([top, left], device=first.corner.device)
    return _Rows(total, corner)


def _step(net: Network, index: int, rows: _Rows, bias: Tensor,
          relaxations: Mapping[int, object]) -> tuple[list[_Rows], Tensor]:
    op = net.ops[index]
    A, corner = rows.A, rows.corner
    size = (A.shape[-2], A.shape[-1])
    if isinstance(op, Add):
        return [rows, rows], bias
    if isinstance(op, Relu):
        relaxation = relaxations[index]
        assert isinstance(relaxation, ReluRelaxation)
        lower = _windows(relaxation.lower_slope, corner, size)
        upper = _windows(relaxation.upper_slope, corner, size)
        intercept = _windows(relaxation.upper_intercept, corner, size)
        negative = A.clamp(max=0)
        bias = bias + (negative * intercept).sum(dim=(2, 3, 4))
        return [_Rows(A * lower + negative * (upper - lower), corner)], bias
    assert isinstance(op, Affine)
    offset = _windows(net.offset(index), corner, size)
    bias = bias + (A * offset).sum(dim=(2, 3, 4))
    batch, count = A.shape[0], A.shape[1]
    if op.patch_transpose is None:
        assert op.fast_transpose is not None  # a per-channel map
        return [_Rows(op.fast_transpose(A.flatten(0, 1)).view(A.shape), corner)], bias
    transpose, stride, padding = op.patch_transpose
    flat = transpose(A.flatten(0, 1))
    flat = flat.reshape(batch, count, *flat.shape[1:])
    corner = corner * torch.tensor(stride, device=corner.device) - torch.tensor(
        padding, device=corner.device)
    mask = _inside(net.in_shape(index), corner, (flat.shape[-2], flat.shape[-1]), flat)
    return [_Rows(flat * mask, corner)], bias


def _final_rows(net: Network, value: int, rows: _Rows, relaxations: Mapping[int, object],
                sizes: list[int] | None = None) -> tuple[_Rows | None, Tensor]:
    """The rows carried back to the input (``None`` when they never reach it) and the
    constant ``(B, R)``; ``sizes`` collects each step's coefficients per row."""
    inputs = net.op_inputs
    pending: dict[int, _Rows] = {value: rows}
    bias = rows.A.new_zeros(rows.A.shape[:2])
    for index in range(value - 1, -1, -1):
        found_rows = pending.pop(index + 1, None)
        if found_rows is None:
            continue
        parts, bias = _step(net, index, found_rows, bias, relaxations)
        for source, part in zip(inputs[index], parts, strict=True):
            if sizes is not None:
                sizes.append(math.prod(part.A.shape[2:]))
            found = pending.get(source)
            pending[source] = part if found is None else _union(found, part)
    return pending.get(0), bias


def patch_bound(net: Network, value: int, A: Tensor, corner: Tensor, box: Box,
                relaxations: Mapping[int, object]) -> Tensor:
    """``min A z_value`` over the input ``box`` for rows ``A: (B, R, C, h, w)`` on windows of
    value ``value`` at ``corner: (R, 2)`` (see the module docstring): ``(B, R)``."""
    first, bias = _final_rows(net, value, _Rows(A, corner), relaxations)
    if first is None:
        return bias
    size = (first.A.shape[-2], first.A.shape[-1])
    center = _windows(box.center, first.corner, size)
    radius = _windows(box.radius, first.corner, size)
    value_part = (first.A * center).sum(dim=(2, 3, 4))
    return value_part - (first.A.abs() * radius).sum(dim=(2, 3, 4)) + bias
