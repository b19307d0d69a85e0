"""Writing an ``nn.Sequential`` of supported layers as an ONNX file (the inverse of the reader).

Useful to hand a Tightrope network to other verifiers, and to test the importer: an exported
model read back must compute what the torch model computes. Layers map to operators as follows:
Linear -> Gemm (``transB=1``) or MatMul + Add, Conv2d -> Conv, ReLU -> Relu, Flatten ->
Flatten, BatchNorm1d/2d (eval) -> BatchNormalization, AvgPool2d -> AveragePool, Normalize ->
Sub + Div, Identity/Dropout -> Identity. Tensors are stored as float32 (``TensorProto`` raw
data) unless ``dtype=torch.float64``. The messages are built with ``onnx.helper``.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator
from typing import Any

import torch
from onnx import NodeProto, TensorProto, helper, numpy_helper
from torch import Tensor, nn

from tightrope.bounds import Normalize

__all__ = ["LinearOp", "export_onnx"]

_ELEM_TYPES = {torch.float32: TensorProto.FLOAT, torch.float64: TensorProto.DOUBLE}


class LinearOp(enum.Enum):
    """How :func:`export_onnx` writes ``nn.Linear``."""

    GEMM = "gemm"
    MATMUL_ADD = "matmul_add"


def _leaves(module: nn.Module) -> Iterator[nn.Module]:
    if type(module) is nn.Sequential:
        for child in module.children():
            yield from _leaves(child)
    else:
        yield module


def _pair(value: int | tuple[int, ...] | str) -> tuple[int, int]:
    if isinstance(value, str):
        raise TypeError(f"string padding {value!r} cannot be exported; give integer padding")
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def export_onnx(
    model: nn.Sequential,
    input_shape: tuple[int, ...],
    path: str | os.PathLike[str] | None = None,
    *,
    linear_op: LinearOp = LinearOp.GEMM,
    dtype: torch.dtype = torch.float32,
    opset: int = 13,
) -> bytes:
    """Serialize ``model`` (input ``(1, *input_shape)``) as ONNX; write it to ``path`` if given.

    Returns:
        the ``.onnx`` file's bytes.

    Raises:
        TypeError: listing every layer that has no ONNX equivalent here.
    """
    if dtype not in _ELEM_TYPES:
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    nodes: list[NodeProto] = []
    tensors: list[TensorProto] = []
    unsupported: list[str] = []
    current = "input"
    reference = next(iter(model.parameters()), None)
    x = torch.zeros(1, *input_shape, dtype=reference.dtype if reference is not None else dtype)

    def constant(name: str, value: Tensor) -> str:
        tensors.append(numpy_helper.from_array(value.detach().to(dtype).cpu().numpy(), name))
        return name

    def node(op: str, inputs: list[str], output: str, name: str, **attributes: Any) -> None:
        nodes.append(helper.make_node(op, inputs, [output], name=name, **attributes))

    for index, layer in enumerate(_leaves(model)):
        out = f"t{index}"
        if isinstance(layer, nn.Linear):
            weight, bias = layer.weight, layer.bias
            if linear_op is LinearOp.GEMM:
                inputs = [current, constant(f"W{index}", weight)]
                if bias is not None:
                    inputs.append(constant(f"b{index}", bias))
                node("Gemm", inputs, out, f"gemm{index}", transB=1)
            else:
                product = out if bias is None else f"m{index}"
                node("MatMul", [current, constant(f"W{index}", weight.T)], product,
                     f"matmul{index}")
                if bias is not None:
                    node("Add", [product, constant(f"b{index}", bias)], out, f"add{index}")
        elif isinstance(layer, nn.Conv2d):
            inputs = [current, constant(f"W{index}", layer.weight)]
            if layer.bias is not None:
                inputs.append(constant(f"b{index}", layer.bias))
            pad = _pair(layer.padding)
            node("Conv", inputs, out, f"conv{index}", kernel_shape=list(layer.kernel_size),
                 strides=list(layer.stride), pads=[*pad, *pad], dilations=list(layer.dilation),
                 group=layer.groups)
        elif isinstance(layer, nn.ReLU):
            node("Relu", [current], out, f"relu{index}")
        elif isinstance(layer, nn.Flatten) and layer.start_dim == 1 and layer.end_dim == -1:
            node("Flatten", [current], out, f"flatten{index}", axis=1)
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and not layer.training:
            mean, var = layer.running_mean, layer.running_var
            if mean is None or var is None:
                unsupported.append(f"{index} ({type(layer).__name__} without running stats)")
                continue
            channels = mean.shape[0]
            gamma = layer.weight if layer.weight is not None else torch.ones(channels)
            beta = layer.bias if layer.bias is not None else torch.zeros(channels)
            inputs = [current] + [constant(f"bn{index}_{k}", v)
                                  for k, v in enumerate((gamma, beta, mean, var))]
            node("BatchNormalization", inputs, out, f"bn{index}", epsilon=float(layer.eps))
        elif isinstance(layer, nn.AvgPool2d) and not layer.ceil_mode:
            pad = _pair(layer.padding)
            stride = _pair(layer.stride if layer.stride is not None else layer.kernel_size)
            node("AveragePool", [current], out, f"pool{index}",
                 kernel_shape=list(_pair(layer.kernel_size)), strides=list(stride),
                 pads=[*pad, *pad], count_include_pad=int(layer.count_include_pad))
        elif isinstance(layer, Normalize):
            view = (1, -1, *([1] * (x.dim() - 2)))
            centred = f"c{index}"
            node("Sub", [current, constant(f"mean{index}", layer.mean.view(view))], centred,
                 f"sub{index}")
            node("Div", [centred, constant(f"std{index}", layer.std.view(view))], out,
                 f"div{index}")
        elif isinstance(layer, (nn.Identity, nn.Dropout)):
            node("Identity", [current], out, f"identity{index}")
        else:
            unsupported.append(f"{index} ({type(layer).__name__})")
            continue
        if not unsupported:
            with torch.no_grad():
                x = layer(x)
        current = out
    if unsupported:
        raise TypeError("export_onnx cannot write these layers: " + ", ".join(unsupported))
    elem = _ELEM_TYPES[dtype]
    graph = helper.make_graph(
        nodes, "tightrope",
        inputs=[helper.make_tensor_value_info("input", elem, (1, *input_shape))],
        outputs=[helper.make_tensor_value_info(current, elem, tuple(x.shape))],
        initializer=tensors,
    )
    onnx_model = helper.make_model(graph, producer_name="tightrope", ir_version=8,
                                   opset_imports=[helper.make_opsetid("", opset)])
    data: bytes = onnx_model.SerializeToString()
    if path is not None:
        with open(path, "wb") as handle:
            handle.write(data)
    return data
