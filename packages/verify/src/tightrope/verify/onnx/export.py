"""Writing a torch model of supported layers as an ONNX file (the inverse of the reader).

Useful to hand a Tightrope network to other verifiers, and to test the importer: an exported
model read back must compute what the torch model computes. Layers map to operators as follows:
Linear -> Gemm (``transB=1``) or MatMul + Add, Conv2d -> Conv, ReLU -> Relu, Flatten ->
Flatten, BatchNorm1d/2d (eval) -> BatchNormalization, AvgPool2d -> AveragePool, Normalize ->
Sub + Div, Identity/Dropout -> Identity. Tensors are stored as float32 (``TensorProto`` raw
data) unless ``dtype=torch.float64``. The messages are built with ``onnx.helper``.

An ``nn.Sequential`` tree of those layers is written as a chain. Any other model that
:func:`tightrope.bounds.lower` accepts (residual blocks, branches) is traced with ``torch.fx``
and written node by node (:mod:`.export_graph`): the layers above, MaxPool2d -> MaxPool, and
the modules of :mod:`tightrope.bounds.modules` (Add -> Add, Concat -> Concat, Reshape ->
Reshape, Permute -> Transpose, Pad -> Pad, Elementwise -> Mul + Add), and the functions
``relu``, ``+``/``-`` of two values, ``+ - * /`` and unary ``-`` with constants,
``torch.cat``, ``flatten``/``view``/``reshape``/``squeeze``/``unsqueeze`` (Reshape),
``permute``/``transpose`` (Transpose) and ``contiguous``.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from onnx import NodeProto, TensorProto, helper, numpy_helper
from torch import Tensor, nn

from tightrope.bounds import Normalize
from tightrope.verify.onnx.export_graph import GRAPH_ONLY_LAYERS, export_graph

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


class _Emitter:
    """The nodes and initializers of the graph under construction, and each layer's operators
    (shared by the chain and the graph exporter: names are made unique by ``index``)."""

    def __init__(self, linear_op: LinearOp, dtype: torch.dtype) -> None:
        self.linear_op = linear_op
        self.dtype = dtype
        self.nodes: list[NodeProto] = []
        self.tensors: list[TensorProto] = []

    def constant(self, name: str, value: Tensor) -> str:
        array = value.detach().to(self.dtype).cpu().numpy()
        self.tensors.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, name: str, values: list[int]) -> str:
        """An int64 initializer (shapes, pads, ...)."""
        self.tensors.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, name: str, **attributes: Any) -> None:
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attributes))

    def linear(self, layer: nn.Linear, index: int, current: str, out: str, rank: int) -> None:
        """Gemm takes matrices only: a Linear on more dimensions is always MatMul + Add."""
        weight, bias = layer.weight, layer.bias
        if self.linear_op is LinearOp.GEMM and rank == 2:
            inputs = [current, self.constant(f"W{index}", weight)]
            if bias is not None:
                inputs.append(self.constant(f"b{index}", bias))
            self.node("Gemm", inputs, out, f"gemm{index}", transB=1)
            return
        product = out if bias is None else f"m{index}"
        self.node("MatMul", [current, self.constant(f"W{index}", weight.T)], product,
                  f"matmul{index}")
        if bias is not None:
            self.node("Add", [product, self.constant(f"b{index}", bias)], out, f"add{index}")

    def conv(self, layer: nn.Conv2d, index: int, current: str, out: str) -> None:
        inputs = [current, self.constant(f"W{index}", layer.weight)]
        if layer.bias is not None:
            inputs.append(self.constant(f"b{index}", layer.bias))
        pad = _pair(layer.padding)
        self.node("Conv", inputs, out, f"conv{index}", kernel_shape=list(layer.kernel_size),
                  strides=list(layer.stride), pads=[*pad, *pad], dilations=list(layer.dilation),
                  group=layer.groups)

    def batch_norm(self, layer: nn.BatchNorm1d | nn.BatchNorm2d, index: int, current: str,
                   out: str) -> str | None:
        mean, var = layer.running_mean, layer.running_var
        if mean is None or var is None:
            return f"{type(layer).__name__} without running stats"
        channels = mean.shape[0]
        gamma = layer.weight if layer.weight is not None else torch.ones(channels)
        beta = layer.bias if layer.bias is not None else torch.zeros(channels)
        inputs = [current] + [self.constant(f"bn{index}_{k}", v)
                              for k, v in enumerate((gamma, beta, mean, var))]
        self.node("BatchNormalization", inputs, out, f"bn{index}", epsilon=float(layer.eps))
        return None

    def layer(self, layer: nn.Module, index: int, current: str, out: str,
              rank: int) -> str | None:
        """Emit ``layer`` applied to ``current`` (of ``rank`` dimensions, batch included) as
        ``out``; returns why it cannot be written (``None``: written)."""
        if isinstance(layer, nn.Linear):
            self.linear(layer, index, current, out, rank)
        elif isinstance(layer, nn.Conv2d):
            self.conv(layer, index, current, out)
        elif isinstance(layer, nn.ReLU):
            self.node("Relu", [current], out, f"relu{index}")
        elif isinstance(layer, nn.Flatten) and layer.start_dim == 1 and layer.end_dim == -1:
            self.node("Flatten", [current], out, f"flatten{index}", axis=1)
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and not layer.training:
            return self.batch_norm(layer, index, current, out)
        elif isinstance(layer, nn.AvgPool2d) and not layer.ceil_mode:
            pad = _pair(layer.padding)
            stride = _pair(layer.stride if layer.stride is not None else layer.kernel_size)
            self.node("AveragePool", [current], out, f"pool{index}",
                      kernel_shape=list(_pair(layer.kernel_size)), strides=list(stride),
                      pads=[*pad, *pad], count_include_pad=int(layer.count_include_pad))
        elif isinstance(layer, Normalize):
            view = (1, -1, *([1] * (rank - 2)))
            centred = f"c{index}"
            self.node("Sub", [current, self.constant(f"mean{index}", layer.mean.view(view))],
                      centred, f"sub{index}")
            self.node("Div", [centred, self.constant(f"std{index}", layer.std.view(view))], out,
                      f"div{index}")
        elif isinstance(layer, (nn.Identity, nn.Dropout)):
            self.node("Identity", [current], out, f"identity{index}")
        else:
            return type(layer).__name__
        return None


def _is_chain(model: nn.Module) -> bool:
    """Whether ``model`` is an ``nn.Sequential`` tree of single-input layers that the chain
    exporter writes (layers that only the graph exporter knows make it a graph)."""
    return type(model) is nn.Sequential and not any(
        list(layer.children()) or isinstance(layer, GRAPH_ONLY_LAYERS)
        for layer in _leaves(model))


def export_onnx(
    model: nn.Module,
    input_shape: tuple[int, ...],
    path: str | os.PathLike[str] | None = None,
    *,
    linear_op: LinearOp = LinearOp.GEMM,
    dtype: torch.dtype = torch.float32,
    opset: int = 13,
) -> bytes:
    """Serialize ``model`` (input ``(1, *input_shape)``) as ONNX; write it to ``path`` if given.

    ``model`` is an ``nn.Sequential`` of layers, or any model ``torch.fx`` traces into the
    supported layers and functions (residual blocks, branches joined by ``+``/``-``/``cat``).

    Returns:
        the ``.onnx`` file's bytes.

    Raises:
        TypeError: listing every layer (or traced node) that has no ONNX equivalent here.
    """
    if dtype not in _ELEM_TYPES:
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    emitter = _Emitter(linear_op, dtype)
    if _is_chain(model):
        current, out_shape = _export_chain(emitter, model, input_shape, dtype)
    else:
        current, out_shape = export_graph(emitter, model, input_shape, opset)
    elem = _ELEM_TYPES[dtype]
    graph = helper.make_graph(
        emitter.nodes, "tightrope",
        inputs=[helper.make_tensor_value_info("input", elem, (1, *input_shape))],
        outputs=[helper.make_tensor_value_info(current, elem, out_shape)],
        initializer=emitter.tensors,
    )
    onnx_model = helper.make_model(graph, producer_name="tightrope", ir_version=8,
                                   opset_imports=[helper.make_opsetid("", opset)])
    data: bytes = onnx_model.SerializeToString()
    if path is not None:
        with open(path, "wb") as handle:
            handle.write(data)
    return data


def _export_chain(emitter: _Emitter, model: nn.Module, input_shape: tuple[int, ...],
                  dtype: torch.dtype) -> tuple[str, tuple[int, ...]]:
    """Emit the layers of an ``nn.Sequential`` tree in order; returns the output's name and
    shape."""
    unsupported: list[str] = []
    current = "input"
    reference = next(iter(model.parameters()), None)
    x = torch.zeros(1, *input_shape, dtype=reference.dtype if reference is not None else dtype)
    for index, layer in enumerate(_leaves(model)):
        out = f"t{index}"
        problem = emitter.layer(layer, index, current, out, x.dim())
        if problem is not None:
            unsupported.append(f"{index} ({problem})")
            continue
        if not unsupported:
            with torch.no_grad():
                x = layer(x)
        current = out
    if unsupported:
        raise TypeError("export_onnx cannot write these layers: " + ", ".join(unsupported))
    return current, tuple(x.shape)
