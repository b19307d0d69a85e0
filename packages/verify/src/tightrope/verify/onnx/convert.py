"""Converting an ONNX graph into a torch module that ``tightrope.bounds`` accepts.

The graph is evaluated once, symbolically, on its single input. Every tensor is either a
*constant* (initializers, ``Constant`` nodes and anything computed from constants only, folded
here) or *live* (it depends on the input). When the live values form one chain (no node takes
two of them, none is used twice) the result is an ``nn.Sequential``, built as below; otherwise
(residual connections, concatenations) it is a ``torch.fx.GraphModule`` built by
:func:`tightrope.verify.onnx.graph.convert_dag`, which keeps each value in its ONNX layout and
supports the same operators plus Add/Sub of two live values, Concat, and reshapes and
Transposes anywhere (``Reshape``/``Permute`` layers). A chain-shaped graph that the chain
rules below cannot express is reported, not handed to the graph converter.

On the chain, each node becomes zero or more torch layers:

* Gemm, MatMul with a constant matrix -> ``nn.Linear``; Conv -> ``nn.Conv2d`` (symmetric pads;
  the graph converter puts a ``Pad`` before it for asymmetric ones); Relu -> ``nn.ReLU``;
  AveragePool, GlobalAveragePool -> ``nn.AvgPool2d``; MaxPool -> ``nn.MaxPool2d`` (symmetric
  pads of at most half the kernel, no dilations, no ceil_mode); Pad (constant mode, not on the
  batch axis) -> ``tightrope.bounds.modules.Pad``;
* Add / Sub / Mul / Div / Neg with constants and BatchNormalization are elementwise affine maps
  ``z -> s * z + t``; consecutive ones are composed and then folded into the preceding Linear
  (or, per channel, Conv) layer, into the following Linear layer, into ``Normalize`` at the
  input (positive per-channel scale) or, failing those, into an eval-mode BatchNorm layer
  (over the flattened value when the map varies within channels). The graph converter makes
  them ``Elementwise`` layers and folds them the same way where it can;
* Flatten, Reshape, Squeeze and Unsqueeze change only the ONNX shape: the torch layout is
  re-derived (an ``nn.Flatten`` before a Linear layer). A Transpose that reorders values is
  carried as a permutation: folded into the next Linear layer's columns, into the model's input
  order when nothing was computed yet (``input_order``; e.g. NHWC inputs), or into a final 0/1
  Linear map at the output; before a Conv, a pooling or a Pad after the first layer it is
  reported.

The ONNX model is evaluated with its declared input shape (symbolic leading dimensions taken as
1); the torch module applies the same per-sample function to a batch ``(N, *S)``. Constants are
combined in float64, so folding adds no rounding beyond the final cast to the requested dtype.

Everything the converter cannot express is collected and raised once (:class:`OnnxImportError`),
together with the initializers and ``Constant`` nodes the graph uses that hold NaN or inf (no
bound over such a network means anything).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from onnx import GraphProto, NodeProto, ValueInfoProto
from torch import Tensor, nn

from tightrope.bounds import Normalize
from tightrope.verify.onnx.constants import (
    DTYPES,
    Shape,
    UnsupportedError,
    attr_float,
    attr_int,
    attr_ints,
    constant_of,
    fold_constant,
    label,
    tensor_values,
)
from tightrope.verify.onnx.graph import convert_dag, per_sample
from tightrope.verify.onnx.layers import (
    conv_layer,
    pad_layer,
    pad_spec,
    pool_layer,
    reshaped,
    symmetric_pads,
)

__all__ = ["Converted", "OnnxImportError", "convert_graph"]

class OnnxImportError(ValueError):
    """The ONNX file is corrupt, or holds nodes the importer cannot convert (all listed)."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = tuple(problems)
        if len(problems) == 1:
            super().__init__(f"{source}: cannot import the ONNX model: {problems[0]}")
        else:
            listing = "\n  - ".join(problems)
            super().__init__(f"{source}: cannot import the ONNX model:\n  - {listing}")


@dataclass(frozen=True, slots=True)
class Converted:
    """The converted network: ``module`` maps ``(N, *input_shape)`` to ``(N, num_outputs)``; an
    ``nn.Sequential`` when the input-dependent values form a chain, else a
    ``torch.fx.GraphModule``."""

    module: nn.Module
    input_shape: Shape
    onnx_input_shape: Shape
    onnx_output_shape: Shape
    input_name: str
    output_name: str
    dtype: torch.dtype
    #: ``model_input_flat[i] = onnx_input_flat[input_order[i]]``; ``None``: the same order.
    input_order: tuple[int, ...] | None = None


@dataclass(slots=True)
class _Variable:
    """The value that depends on the input: its ONNX shape and the layout of the torch tensor.

    ``layout`` is the per-sample shape of the torch tensor that holds it. ``order`` maps the
    two: element ``i`` of the flattened ONNX value sits at flat position ``order[i]`` of the
    torch tensor (``None``: the same row-major order; a value-reordering Transpose sets it).
    ``scale``/``shift`` (flat, in torch positions) are a pending elementwise map
    ``z -> scale * z + shift`` not yet emitted.
    """

    name: str
    shape: Shape
    layout: Shape
    scale: Tensor | None = None
    shift: Tensor | None = None
    order: Tensor | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(slots=True)
class _Builder:
    layers: list[nn.Module] = field(default_factory=list)
    input_layout: Shape = ()
    #: ``model_input_flat[i] = onnx_input_flat[input_order[i]]`` (``None``: the same order).
    input_order: Tensor | None = None
    #: Whether ``layers[-1]`` is affine and may absorb a following elementwise map.
    last_absorbs: bool = False


def _to_torch_positions(var: _Variable, values: Tensor) -> Tensor:
    """Flat values in ONNX order -> the same values at the torch tensor's positions."""
    if var.order is None:
        return values
    moved = torch.empty_like(values)
    moved[var.order] = values
    return moved


def _elementwise(var: _Variable, scale: Tensor, shift: Tensor) -> None:
    """Compose ``z -> scale * z + shift`` (flat, float64, ONNX order) after the variable's
    pending map."""
    scale, shift = _to_torch_positions(var, scale), _to_torch_positions(var, shift)
    if var.scale is None or var.shift is None:
        var.scale, var.shift = scale, shift
    else:
        var.scale, var.shift = scale * var.scale, scale * var.shift + shift


def _broadcast_constant(var: _Variable, constant: Tensor, node: NodeProto) -> Tensor:
    """``constant`` broadcast to the variable's ONNX shape, flat, float64."""
    shape = tuple(constant.shape)
    if len(shape) > len(var.shape) or any(
        c not in (1, v) for c, v in zip(reversed(shape), reversed(var.shape), strict=False)
    ):
        raise UnsupportedError(f"a constant of shape {shape} does not broadcast to the "
                                f"shape {var.shape} of the input-dependent value")
    return constant.to(torch.float64).expand(var.shape).reshape(-1)


def _per_channel(values: Tensor, layout: Shape) -> Tensor | None:
    """The per-channel values (``layout[0]`` of them) if ``values`` is constant per channel."""
    grid = values.reshape(layout[0], -1)
    if bool((grid == grid[:, :1]).all()):
        return grid[:, 0].clone()
    return None


def _absorb_backward(var: _Variable, builder: _Builder) -> bool:
    """Fold the pending map into the preceding Linear (or, per channel, Conv2d) layer."""
    if var.scale is None or var.shift is None or not builder.last_absorbs:
        return False
    scale, shift = var.scale, var.shift
    last = builder.layers[-1]
    if isinstance(last, nn.Conv2d):
        channel_scale = _per_channel(scale, var.layout)
        channel_shift = _per_channel(shift, var.layout)
        if channel_scale is None or channel_shift is None:
            return False
        scale, shift = channel_scale, channel_shift
    elif not isinstance(last, nn.Linear):
        return False
    bias = last.bias
    if bias is None:  # never: the importer always creates layers with a bias
        return False
    with torch.no_grad():
        last.weight.mul_(scale.view(-1, *([1] * (last.weight.dim() - 1))))
        bias.mul_(scale).add_(shift)
    var.scale = var.shift = None
    return True


def _flush(var: _Variable, builder: _Builder, next_linear: nn.Linear | None = None) -> None:
    """Emit the pending elementwise map of ``var``: folded into the previous layer, into
    ``next_linear`` (about to be appended), or as a Normalize/BatchNorm layer of its own."""
    if var.scale is None or var.shift is None:
        return
    if bool((var.scale == 1).all()) and bool((var.shift == 0).all()):
        var.scale = var.shift = None
        return
    if _absorb_backward(var, builder):
        return
    scale, shift = var.scale, var.shift
    var.scale = var.shift = None
    if next_linear is not None and next_linear.bias is not None:
        with torch.no_grad():
            next_linear.bias.add_(next_linear.weight @ shift)
            next_linear.weight.mul_(scale[None, :])
        return
    channel_scale = _per_channel(scale, var.layout)
    channel_shift = _per_channel(shift, var.layout)
    if channel_scale is None or channel_shift is None or len(var.layout) > 3:
        # Varies within channels: make every value its own channel (a later Conv then
        # reports that it cannot take a flat value).
        if len(var.layout) != 1:
            builder.layers.append(nn.Flatten())
            var.layout = (var.numel,)
        channel_scale, channel_shift = scale, shift
    if not builder.layers and bool((channel_scale > 0).all()):
        normalize = Normalize([0.0] * len(channel_scale), [1.0] * len(channel_scale))
        normalize.mean = -channel_shift / channel_scale
        normalize.std = 1.0 / channel_scale
        builder.layers.append(normalize)
    else:
        norm_type = nn.BatchNorm1d if len(var.layout) < 3 else nn.BatchNorm2d
        norm = norm_type(var.layout[0], eps=0.0, dtype=torch.float64)
        with torch.no_grad():
            norm.weight.copy_(channel_scale)
            norm.bias.copy_(channel_shift)
        builder.layers.append(norm.eval())
    builder.last_absorbs = False


def _emit_linear(var: _Variable, builder: _Builder, weight: Tensor, bias: Tensor | None,
                 out_shape: Shape) -> None:
    """Append ``Linear(weight: (m, n), bias: (m,))`` acting on the flattened variable."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], dtype=torch.float64)
    if var.order is not None:  # the columns follow the torch tensor's positions
        columns = torch.empty_like(weight)
        columns[:, var.order] = weight
        weight = columns
        var.order = None
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias if bias is not None else torch.zeros(weight.shape[0]))
    if len(var.layout) != 1:
        _absorb_backward(var, builder)
        builder.layers.append(nn.Flatten())
        builder.last_absorbs = False
        var.layout = (var.numel,)
    _flush(var, builder, next_linear=linear)
    builder.layers.append(linear)
    builder.last_absorbs = True
    var.shape = out_shape
    var.layout = (math.prod(out_shape),)


def _need_image_layout(var: _Variable, builder: _Builder, node: NodeProto) -> None:
    if len(var.shape) != 4 or var.shape[0] != 1:
        raise UnsupportedError(f"needs a (1, C, H, W) input, got {var.shape}")
    if var.layout != var.shape[1:] or var.order is not None:
        if builder.layers:
            what = "reorder" if var.order is not None else "reshape a flat value to"
            raise UnsupportedError(f"would need to {what} {var.shape}, which "
                                    "tightrope.bounds cannot express after the first layer")
        # Nothing computed yet: let the model's input be the value in its current ONNX order.
        if var.order is not None:
            builder.input_order = var.order
            if var.scale is not None and var.shift is not None:
                var.scale, var.shift = var.scale[var.order], var.shift[var.order]
            var.order = None
        builder.input_layout = var.shape[1:]
        var.layout = var.shape[1:]


def _convert_variable_node(
    node: NodeProto, var: _Variable, constants: dict[str, Tensor], builder: _Builder, opset: int
) -> None:
    """Turn one node on the input-dependent chain into layers; updates ``var`` in place."""
    op = node.op_type
    inputs = list(node.input)
    position = inputs.index(var.name)

    def const(index: int) -> Tensor:
        name = inputs[index] if index < len(inputs) else ""
        if not name:
            raise UnsupportedError(f"input {index} is missing")
        if name not in constants:
            raise UnsupportedError(f"input {index} ({name!r}) depends on the network input too "
                               "(only one input-dependent operand is supported)")
        return constants[name]

    if op in ("Relu",):
        _flush(var, builder)
        builder.layers.append(nn.ReLU())
        builder.last_absorbs = False
    elif op in ("Identity", "Dropout"):
        pass
    elif op == "Cast":
        target = DTYPES.get(attr_int(node, "to", 1))
        if target not in (torch.float32, torch.float64, torch.float16):
            raise UnsupportedError("Cast of the input-dependent value to a non-float type")
    elif op in ("Add", "Sub", "Mul", "Div"):
        other = _broadcast_constant(var, const(1 - position), node)
        ones, zeros = torch.ones_like(other), torch.zeros_like(other)
        if op == "Add":
            _elementwise(var, ones, other)
        elif op == "Sub":
            _elementwise(var, ones if position == 0 else -ones, -other if position == 0 else other)
        elif op == "Mul":
            _elementwise(var, other, zeros)
        elif position == 0:
            if bool((other == 0).any()):
                raise UnsupportedError("division by a constant that has zeros")
            _elementwise(var, 1.0 / other, zeros)
        else:
            raise UnsupportedError("division by the input-dependent value is not affine")
    elif op == "Neg":
        minus = -torch.ones(var.numel, dtype=torch.float64)
        _elementwise(var, minus, torch.zeros_like(minus))
    elif op == "BatchNormalization":
        if len(var.shape) < 2:
            raise UnsupportedError(f"BatchNormalization needs (N, C, ...), got {var.shape}")
        gamma, beta, mean, variance = (const(i).to(torch.float64) for i in range(1, 5))
        scale = gamma / torch.sqrt(variance + attr_float(node, "epsilon", 1e-5))
        view = (1, -1, *([1] * (len(var.shape) - 2)))
        _elementwise(var, _broadcast_constant(var, scale.view(view), node),
                     _broadcast_constant(var, (beta - mean * scale).view(view), node))
    elif op == "Transpose":
        perm = attr_ints(node, "perm") or tuple(reversed(range(len(var.shape))))
        source = torch.arange(var.numel).reshape(var.shape).permute(*perm).reshape(-1)
        if not bool((source == torch.arange(var.numel)).all()):
            var.order = source if var.order is None else var.order[source]
        var.shape = tuple(var.shape[axis] for axis in perm)
    elif op in ("Flatten", "Reshape", "Squeeze", "Unsqueeze"):
        var.shape = reshaped(node, var.shape, constants)
    elif op in ("Gemm", "MatMul"):
        _convert_matrix_product(node, var, const, builder, position)
    elif op == "Conv":
        _convert_conv(node, var, const, builder, inputs)
    elif op in ("AveragePool", "MaxPool", "GlobalAveragePool", "Pad"):
        _convert_window(node, var, constants, builder)
    else:
        raise UnsupportedError(f"operator {op} is not supported")


def _convert_matrix_product(node: NodeProto, var: _Variable, const: Callable[[int], Tensor],
                            builder: _Builder, position: int) -> None:
    """Gemm or MatMul by a constant matrix on the chain: a Linear layer."""
    inputs = list(node.input)
    if node.op_type == "Gemm":
        if position != 0 or attr_int(node, "transA", 0):
            raise UnsupportedError("Gemm with the input-dependent value as B, or with transA=1")
        matrix = const(1).to(torch.float64)
        if attr_int(node, "transB", 0):
            matrix = matrix.T
        if var.shape != (1, matrix.shape[0]):
            raise UnsupportedError(f"Gemm of {var.shape} by {tuple(matrix.shape)}")
        m = matrix.shape[1]
        bias = None
        if len(inputs) > 2 and inputs[2]:
            bias = torch.broadcast_to(const(2).to(torch.float64), (1, m)).reshape(m)
            bias = bias * attr_float(node, "beta", 1.0)
        weight = attr_float(node, "alpha", 1.0) * matrix.T
        _emit_linear(var, builder, weight, bias, (1, m))
        return
    matrix = const(1 - position).to(torch.float64)
    if matrix.dim() != 2:
        raise UnsupportedError(f"MatMul by a constant of rank {matrix.dim()} (need 2)")
    if position == 0:  # x @ W acts on the last axis
        n = matrix.shape[0]
        if var.shape[-1] != n or var.numel != n:
            raise UnsupportedError(f"MatMul of {var.shape} by {tuple(matrix.shape)}")
        _emit_linear(var, builder, matrix.T, None, (*var.shape[:-1], matrix.shape[1]))
    else:  # W @ x contracts the second-to-last axis (or the only one)
        n = matrix.shape[1]
        vector = len(var.shape) == 1
        if var.numel != n or (not vector and var.shape[-2:] != (n, 1)):
            raise UnsupportedError(f"MatMul of {tuple(matrix.shape)} by {var.shape}")
        out = (matrix.shape[0],) if vector else (*var.shape[:-2], matrix.shape[0], 1)
        _emit_linear(var, builder, matrix, None, out)


def _convert_conv(node: NodeProto, var: _Variable, const: Callable[[int], Tensor],
                  builder: _Builder, inputs: list[str]) -> None:
    if inputs.index(var.name) != 0:
        raise UnsupportedError("Conv with input-dependent weights")
    weight = const(1).to(torch.float64)
    if weight.dim() != 4:
        raise UnsupportedError(f"only 2-D convolutions are supported, weight "
                                f"{tuple(weight.shape)}")
    _need_image_layout(var, builder, node)
    _flush(var, builder)
    bias = const(2) if len(inputs) > 2 and inputs[2] else None
    conv = conv_layer(node, weight, bias, symmetric_pads(node))
    if conv.in_channels != var.layout[0]:
        raise UnsupportedError(f"Conv weight {tuple(weight.shape)} does not fit input {var.shape}")
    builder.layers.append(conv)
    builder.last_absorbs = True
    out = conv(torch.zeros(1, *var.layout, dtype=torch.float64))
    var.shape = tuple(out.shape)
    var.layout = var.shape[1:]


def _convert_window(node: NodeProto, var: _Variable, constants: dict[str, Tensor],
                    builder: _Builder) -> None:
    """A pooling or constant Pad node on the chain: its layer, on the (1, C, H, W) value."""
    _need_image_layout(var, builder, node)
    _flush(var, builder)
    _need_image_layout(var, builder, node)  # the flush may have flattened the value
    layer: nn.Module
    if node.op_type == "Pad":
        begins, ends, value = pad_spec(node, constants, len(var.shape))
        if begins[0] or ends[0]:
            raise UnsupportedError("padding the batch axis is not supported")
        layer = pad_layer(begins[1:], ends[1:], value)
        var.shape = tuple(d + b + e for d, b, e in zip(var.shape, begins, ends, strict=True))
    else:
        layer, var.shape = pool_layer(node, var.shape)
    builder.layers.append(layer)
    builder.last_absorbs = False
    var.layout = var.shape[1:]


def _finite(values: Tensor) -> bool:
    return not values.is_floating_point() or bool(torch.isfinite(values).all())


def _topological(nodes: Sequence[NodeProto], available: set[str]) -> list[NodeProto]:
    """``nodes`` in an order where every node comes after the producers of its inputs (file
    order where possible; ONNX requires it, not every exporter honours it). Nodes whose inputs
    never become available stay at the end, in file order, to be reported."""
    ordered: list[NodeProto] = []
    pending = list(nodes)
    known = set(available)
    progress = True
    while pending and progress:
        progress = False
        waiting = []
        for node in pending:
            if all(not name or name in known for name in node.input):
                ordered.append(node)
                known.update(node.output)
                progress = True
            else:
                waiting.append(node)
        pending = waiting
    return ordered + pending


def _declared(info: ValueInfoProto) -> tuple[int, tuple[int | None, ...] | None]:
    """The element type (0 if none) and shape (``None`` for symbolic dims; ``None`` if not
    declared) of a graph input."""
    if not info.type.HasField("tensor_type"):
        return 0, None
    tensor_type = info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return tensor_type.elem_type, None
    return tensor_type.elem_type, tuple(
        int(d.dim_value) if d.HasField("dim_value") else None for d in tensor_type.shape.dim)


def convert_graph(graph: GraphProto, opset: int, source: str) -> Converted:
    """Convert ``graph`` (one input, one output) into a :class:`Converted` float64 module: an
    ``nn.Sequential`` when its input-dependent values form a chain, else a
    ``torch.fx.GraphModule`` (:func:`tightrope.verify.onnx.graph.convert_dag`).

    ``opset`` is the model's default-domain opset version (0 when not declared).

    Raises:
        OnnxImportError: listing every node that cannot be converted and every initializer or
            ``Constant`` node the graph uses that holds NaN or inf.
    """
    try:
        constants = {tensor.name: tensor_values(tensor) for tensor in graph.initializer}
    except UnsupportedError as error:
        raise OnnxImportError(source, [str(error)]) from error
    used = {name for node in graph.node for name in node.input}
    non_finite = [f"initializer {name!r}" for name, values in constants.items()
                  if name in used and not _finite(values)]
    info, elem_type, onnx_shape = _graph_input(graph, constants, source)
    output = graph.output[0].name
    dtype = DTYPES.get(elem_type, torch.float32)
    nodes = _topological(graph.node, set(constants) | {info.name})
    if _is_chain(nodes, info.name):
        return _convert_chain(nodes, constants, non_finite, info.name, onnx_shape, output,
                              opset, source, dtype)
    module, output_shape, problems = convert_dag(nodes, constants, non_finite, info.name,
                                                 onnx_shape, output, opset)
    if module is None or problems or non_finite:
        raise OnnxImportError(source, _with_non_finite(problems, non_finite))
    return Converted(module, per_sample(onnx_shape), onnx_shape, output_shape, info.name, output,
                     dtype)


def _with_non_finite(problems: list[str], non_finite: list[str]) -> list[str]:
    if not non_finite:
        return problems
    return [f"NaN or inf values in {', '.join(non_finite)}: such a network cannot be verified; "
            "fix or re-export it with finite weights", *problems]


def _graph_input(graph: GraphProto, constants: dict[str, Tensor],
                 source: str) -> tuple[ValueInfoProto, int, Shape]:
    """The graph's one input, its element type and ONNX shape (symbolic batch size as 1);
    checks that there is one output."""
    real_inputs = [v for v in graph.input if v.name not in constants]
    if len(real_inputs) != 1:
        names = [v.name for v in real_inputs]
        raise OnnxImportError(source, [f"the graph needs exactly one input, has {names}"])
    if len(graph.output) != 1:
        names = [v.name for v in graph.output]
        raise OnnxImportError(source, [f"the graph needs exactly one output, has {names}"])
    info = real_inputs[0]
    elem_type, shape = _declared(info)
    if shape is None:
        raise OnnxImportError(source, [f"input {info.name!r} has no declared shape"])
    if any(d is None or d <= 0 for d in shape[1:]):
        raise OnnxImportError(source, [f"input {info.name!r} has shape {shape}: only "
                                       "the leading (batch) dimension may be symbolic"])
    if elem_type not in (1, 11, 10):
        raise OnnxImportError(source, [f"input {info.name!r} is not a float tensor "
                                       f"(data type {elem_type})"])
    return info, elem_type, tuple(1 if d is None or d <= 0 else d for d in shape)


def _is_chain(nodes: Sequence[NodeProto], input_name: str) -> bool:
    """Whether the input-dependent values form one chain: no node takes two of them and none
    is used twice (``Shape`` of a value, a constant, does not count)."""
    live = {input_name}
    used: set[str] = set()
    for node in nodes:
        if node.op_type == "Shape":
            continue
        taken = [name for name in node.input if name in live]
        if len(taken) > 1 or any(name in used for name in taken):
            return False
        if taken:
            used.update(taken)
            live.update(name for name in node.output if name)
    return True


def _convert_chain(nodes: Sequence[NodeProto], constants: dict[str, Tensor],
                   non_finite: list[str], input_name: str, onnx_shape: Shape, output: str,
                   opset: int, source: str, dtype: torch.dtype) -> Converted:
    """The chain converter: one ``_Variable`` walks the chain, collecting layers."""
    problems: list[str] = []
    layout = onnx_shape[1:] if len(onnx_shape) >= 2 and onnx_shape[0] == 1 else onnx_shape
    var: _Variable | None = _Variable(input_name, onnx_shape, layout or (1,))
    builder = _Builder(input_layout=layout or (1,))
    dead: set[str] = set()  # outputs of nodes that failed: skip what depends on them
    for node in nodes:
        missing = [n for n in node.input if n and n not in constants and n not in dead
                   and (var is None or n != var.name)]
        if missing:
            problems.append(f"{label(node)}: uses {missing}, which no earlier node produces "
                            "(nodes in a cycle, or a name nothing defines)")
            dead.update(node.output)
            continue
        if any(n in dead for n in node.input):
            if node.op_type not in _KNOWN_OPS:
                problems.append(f"{label(node)}: operator {node.op_type} is not supported")
            dead.update(node.output)
            continue
        try:
            if node.op_type == "Constant":
                constants[node.output[0]] = constant_of(node.attribute[0])
                if not _finite(constants[node.output[0]]):
                    non_finite.append(f"{label(node)} (output {node.output[0]!r})")
            elif node.op_type == "Shape" and var is not None and node.input[0] == var.name:
                constants[node.output[0]] = torch.tensor(var.shape, dtype=torch.int64)
            elif var is None or var.name not in node.input:
                value = fold_constant(node, [constants[n] for n in node.input if n], opset)
                constants[node.output[0]] = value
            else:
                _convert_variable_node(node, var, constants, builder, opset)
                var.name = node.output[0]
        except (UnsupportedError, RuntimeError, IndexError, KeyError, TypeError,
                ValueError) as error:
            problems.append(f"{label(node)}: {error}")
            dead.update(node.output)
            if var is not None and var.name in node.input:
                var = None
    problems = _with_non_finite(problems, non_finite)
    if var is not None and var.name != output and not problems:
        problems.append(f"the graph output {output!r} is not the end of the input-dependent "
                        f"chain (which ends at {var.name!r})")
    if problems or var is None:
        raise OnnxImportError(source, problems or ["the input-dependent chain is broken"])
    module = _finish_chain(var, builder, source)
    order = None if builder.input_order is None else tuple(builder.input_order.tolist())
    return Converted(module, builder.input_layout, onnx_shape, var.shape, input_name, output,
                     dtype, order)


def _finish_chain(var: _Variable, builder: _Builder, source: str) -> nn.Sequential:
    """The chain's last layers (the pending map, a Flatten, the output order) and module."""
    try:
        _flush(var, builder)
    except UnsupportedError as error:
        raise OnnxImportError(source, [f"at the output: {error}"]) from error
    if len(var.layout) != 1:
        builder.layers.append(nn.Flatten())
    if var.order is not None:  # put the outputs back in ONNX order: an exact 0/1 Linear map
        permutation = nn.Linear(var.numel, var.numel, dtype=torch.float64)
        with torch.no_grad():
            permutation.weight.zero_()
            permutation.weight[torch.arange(var.numel), var.order] = 1.0
            permutation.bias.zero_()
        builder.layers.append(permutation)
    return nn.Sequential(*builder.layers).to(torch.float64).eval()


_KNOWN_OPS = frozenset({
    "Relu", "Identity", "Dropout", "Cast", "Add", "Sub", "Mul", "Div", "Neg",
    "BatchNormalization", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Gemm",
    "MatMul", "Conv", "AveragePool", "Constant", "Shape", "Gather", "Concat", "MaxPool",
    "GlobalAveragePool", "Pad",
})
