"""ONNX node attributes -> torch layers, shared by the chain and the graph converters:
convolution, pooling and padding layers with the checks that keep them equal to the ONNX
operator, and the shape a reshaping node gives.

Anything a layer cannot express raises :class:`UnsupportedError`, which the converters collect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from onnx import NodeProto
from torch import Tensor, nn

from tightrope.bounds.modules import Pad
from tightrope.verify.onnx.constants import (
    Shape,
    UnsupportedError,
    attr_float,
    attr_int,
    attr_ints,
    attr_str,
    axes_count,
    axis_list,
    reshape_target,
)

__all__ = [
    "conv_layer",
    "conv_pads",
    "pad_layer",
    "pad_spec",
    "pair",
    "pool_layer",
    "reshaped",
    "symmetric_pads",
    "torch_pads",
    "window_shape",
]


def pair(values: Sequence[int]) -> tuple[int, int]:
    if len(values) != 2:
        raise UnsupportedError(f"expected two spatial values, got {list(values)}")
    return (values[0], values[1])


def conv_pads(node: NodeProto, spatial: int = 2) -> tuple[int, ...]:
    """The ``pads`` of a Conv or pooling node (begins, then ends), checked."""
    auto_pad = attr_str(node, "auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        raise UnsupportedError(f"auto_pad={auto_pad} (export with explicit pads)")
    pads = attr_ints(node, "pads") or (0,) * (2 * spatial)
    if len(pads) != 2 * spatial or any(p < 0 for p in pads):
        raise UnsupportedError(f"pads {list(pads)} (need {2 * spatial} non-negative values)")
    return tuple(pads)


def symmetric_pads(node: NodeProto, spatial: int = 2, why: str = "") -> tuple[int, int]:
    """The per-axis padding of a node whose ``pads`` are the same at both ends."""
    pads = conv_pads(node, spatial)
    if tuple(pads[:spatial]) != tuple(pads[spatial:]):
        raise UnsupportedError(f"asymmetric pads {list(pads)}{why}")
    return pair(pads[:spatial])


def torch_pads(begins: Sequence[int], ends: Sequence[int]) -> tuple[int, ...]:
    """ONNX per-axis pads (first axis first) -> ``torch.nn.functional.pad``'s order (last axis
    first), without the unpadded leading axes."""
    pads: list[int] = []
    for begin, end in zip(reversed(begins), reversed(ends), strict=True):
        pads += [begin, end]
    while len(pads) > 2 and pads[-2:] == [0, 0]:
        pads = pads[:-2]
    return tuple(pads)


def window_shape(shape: Shape, channels: int, kernel: Sequence[int], stride: Sequence[int],
                 pads: Sequence[int], dilation: Sequence[int] = (1, 1)) -> Shape:
    """The ``(1, channels, H', W')`` output of a 2-D window (Conv, pooling) on ``shape``."""
    out = [(size + pads[i] + pads[i + 2] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
           for i, size in enumerate(shape[2:])]
    if any(d <= 0 for d in out):
        raise UnsupportedError(f"the window {tuple(kernel)} does not fit the input {shape}")
    return (1, channels, *out)


def conv_layer(node: NodeProto, weight: Tensor, bias: Tensor | None,
               padding: tuple[int, int]) -> nn.Conv2d:
    """The float64 ``nn.Conv2d`` of a 2-D Conv node with constant ``weight`` and ``bias``."""
    if weight.dim() != 4:
        raise UnsupportedError(f"only 2-D convolutions are supported, weight "
                               f"{tuple(weight.shape)}")
    groups = attr_int(node, "group", 1)
    conv = nn.Conv2d(
        weight.shape[1] * groups, weight.shape[0], pair(tuple(weight.shape[2:])),
        stride=pair(attr_ints(node, "strides") or (1, 1)), padding=padding,
        dilation=pair(attr_ints(node, "dilations") or (1, 1)), groups=groups,
        dtype=torch.float64,
    )
    conv_bias = conv.bias
    if conv_bias is None:  # never: bias=True is the default
        raise UnsupportedError("internal: Conv2d without a bias")
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv_bias.copy_(bias if bias is not None else torch.zeros(weight.shape[0]))
    return conv


def pool_layer(node: NodeProto, shape: Shape) -> tuple[nn.Module, Shape]:
    """The layer of a MaxPool, AveragePool or GlobalAveragePool node on a ``(1, C, H, W)``
    value, and its output shape."""
    op = node.op_type
    if op == "GlobalAveragePool":
        return nn.AvgPool2d(pair(shape[2:])), (*shape[:2], 1, 1)
    kernel = attr_ints(node, "kernel_shape") or ()
    if len(kernel) != 2:
        raise UnsupportedError(f"only 2-D {op} is supported, kernel_shape {list(kernel)}")
    if attr_int(node, "ceil_mode", 0):
        raise UnsupportedError("ceil_mode=1 is not supported (re-export with ceil_mode=0)")
    dilations = attr_ints(node, "dilations") or (1, 1)
    if tuple(dilations) != (1, 1):
        raise UnsupportedError(f"dilations {list(dilations)} are not supported (only 1)")
    why = (" (nn.MaxPool2d pads both sides alike, and padding with -inf first is not "
           "supported)" if op == "MaxPool" else "")
    padding = symmetric_pads(node, 2, why)
    if any(2 * p > k for p, k in zip(padding, kernel, strict=True)):
        raise UnsupportedError(f"pads {list(padding)} larger than half the kernel "
                               f"{list(kernel)} are not supported")
    stride = pair(attr_ints(node, "strides") or (1, 1))
    layer: nn.Module
    if op == "MaxPool":
        if len(node.output) > 1 and node.output[1]:
            raise UnsupportedError("the Indices output of MaxPool is not supported")
        layer = nn.MaxPool2d(pair(kernel), stride=stride, padding=padding)
    else:
        layer = nn.AvgPool2d(pair(kernel), stride=stride, padding=padding,
                             count_include_pad=bool(attr_int(node, "count_include_pad", 0)))
    return layer, window_shape(shape, shape[1], kernel, stride, padding * 2)


def pad_spec(node: NodeProto, constants: dict[str, Tensor],
             rank: int) -> tuple[list[int], list[int], float]:
    """A constant-mode Pad node's per-axis pads (begins, ends) and padding value."""
    mode = attr_str(node, "mode", "constant")
    if mode != "constant":
        raise UnsupportedError(f"mode={mode} (only constant padding is supported)")

    def const(index: int) -> Tensor | None:
        name = node.input[index] if index < len(node.input) else ""
        if not name:
            return None
        if name not in constants:
            raise UnsupportedError(f"input {index} ({name!r}) depends on the network input")
        return constants[name]

    pads = attr_ints(node, "pads")  # Pad-2 (before opset 11): attributes
    value = attr_float(node, "value", 0.0)
    axes = list(range(rank))
    if pads is None:
        pads_input = const(1)
        pads = () if pads_input is None else tuple(int(v) for v in pads_input.reshape(-1))
        value_input = const(2)
        value = 0.0 if value_input is None else float(value_input.reshape(-1)[0])
        axes_input = const(3)
        if axes_input is not None:
            axes = [int(a) + rank if int(a) < 0 else int(a) for a in axes_input.reshape(-1)]
    if len(pads) != 2 * len(axes):
        raise UnsupportedError(f"pads {list(pads)} do not fit the {len(axes)} padded axes")
    if any(p < 0 for p in pads):
        raise UnsupportedError(f"negative pads {list(pads)} (cropping) are not supported")
    if not math.isfinite(value):
        raise UnsupportedError(f"padding value {value} is not finite")
    begins, ends = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        begins[axis], ends[axis] = pads[i], pads[i + len(axes)]
    return begins, ends, value


def pad_layer(begins: Sequence[int], ends: Sequence[int], value: float) -> Pad:
    return Pad(torch_pads(begins, ends), value)


def reshaped(node: NodeProto, shape: Shape, constants: dict[str, Tensor]) -> Shape:
    """The new ONNX shape of a reshaping node (Flatten, Reshape, Squeeze, Unsqueeze)."""
    op = node.op_type
    if op == "Flatten":
        axis = attr_int(node, "axis", 1)
        axis = axis + len(shape) if axis < 0 else axis
        return (math.prod(shape[:axis]), math.prod(shape[axis:]))
    if op == "Reshape":
        if node.input[1] not in constants:
            raise UnsupportedError("Reshape with an input-dependent target shape")
        target = [int(v) for v in constants[node.input[1]].reshape(-1).tolist()]
        return reshape_target(shape, target, bool(attr_int(node, "allowzero", 0)))
    if op == "Squeeze":
        axes = axis_list(node, constants, len(shape))
        return tuple(d for i, d in enumerate(shape) if (i not in axes if axes else d != 1))
    if op == "Unsqueeze":
        axes = axis_list(node, constants, len(shape) + axes_count(node, constants))
        out = list(shape)
        for axis in sorted(axes):
            out.insert(axis, 1)
        return tuple(out)
    raise UnsupportedError(f"{op} is not a reshape")
