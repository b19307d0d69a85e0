"""Converting an ONNX graph into an ``nn.Sequential`` that ``tightrope.bounds`` accepts.

The graph is evaluated once, symbolically, on its single input. Every tensor is either a
*constant* (initializers, ``Constant`` nodes and anything computed from constants only, folded
here) or the *variable*: the one chain of values that depends on the input. Each node on the
chain becomes zero or more torch layers:

* Gemm, MatMul with a constant matrix -> ``nn.Linear``; Conv -> ``nn.Conv2d``; Relu ->
  ``nn.ReLU``; AveragePool -> ``nn.AvgPool2d``;
* Add / Sub / Mul / Div / Neg with constants and BatchNormalization are elementwise affine maps
  ``z -> s * z + t``; consecutive ones are composed and then folded into the preceding Linear
  (or, per channel, Conv) layer, into the following Linear layer, into ``Normalize`` at the
  input (positive per-channel scale) or, failing those, into an eval-mode BatchNorm layer
  (over the flattened value when the map varies within channels);
* Flatten, Reshape, Squeeze and Unsqueeze change only the ONNX shape: the torch layout is
  re-derived (an ``nn.Flatten`` before a Linear layer). A Transpose that reorders values is
  carried as a permutation: folded into the next Linear layer's columns, into the model's input
  order when nothing was computed yet (``input_order``; e.g. NHWC inputs), or into a final 0/1
  Linear map at the output; before a Conv after the first layer it is reported.

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
    attr_str,
    axes_count,
    axis_list,
    constant_of,
    fold_constant,
    label,
    reshape_target,
    tensor_values,
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
    """The converted network: ``module`` maps ``(N, *input_shape)`` to ``(N, num_outputs)``."""

    module: nn.Sequential
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


def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    if len(values) != 2:
        raise UnsupportedError(f"expected two spatial values, got {list(values)}")
    return (values[0], values[1])


def _pads(node: NodeProto, spatial: int) -> tuple[int, int]:
    auto_pad = attr_str(node, "auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        raise UnsupportedError(f"auto_pad={auto_pad} (export with explicit pads)")
    pads = attr_ints(node, "pads") or (0,) * (2 * spatial)
    if tuple(pads[:spatial]) != tuple(pads[spatial:]):
        raise UnsupportedError(f"asymmetric pads {pads}")
    return _pair(tuple(pads[:spatial]))


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
        var.shape = _reshape_variable(node, var.shape, constants)
    elif op == "Gemm":
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
    elif op == "MatMul":
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
    elif op == "Conv":
        _convert_conv(node, var, const, builder, inputs)
    elif op == "AveragePool":
        _need_image_layout(var, builder, node)
        _flush(var, builder)
        kernel = attr_ints(node, "kernel_shape") or ()
        if len(kernel) != 2 or attr_int(node, "ceil_mode", 0):
            raise UnsupportedError("only 2-D AveragePool without ceil_mode is supported")
        pool = nn.AvgPool2d(
            _pair(kernel), stride=_pair(attr_ints(node, "strides") or (1, 1)),
            padding=_pads(node, 2), count_include_pad=bool(attr_int(node, "count_include_pad", 0)),
        )
        builder.layers.append(pool)
        builder.last_absorbs = False
        out = pool(torch.zeros(1, *var.layout))
        var.shape = tuple(out.shape)
        var.layout = var.shape[1:]
    elif op == "MaxPool":
        raise UnsupportedError("MaxPool is not supported by tightrope.bounds (export the network "
                           "with AveragePool or strided convolutions)")
    else:
        raise UnsupportedError(f"operator {op} is not supported")


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
    groups = attr_int(node, "group", 1)
    conv = nn.Conv2d(
        weight.shape[1] * groups, weight.shape[0], _pair(tuple(weight.shape[2:])),
        stride=_pair(attr_ints(node, "strides") or (1, 1)),
        padding=_pads(node, 2),
        dilation=_pair(attr_ints(node, "dilations") or (1, 1)),
        groups=groups, dtype=torch.float64,
    )
    if conv.in_channels != var.layout[0]:
        raise UnsupportedError(f"Conv weight {tuple(weight.shape)} does not fit input {var.shape}")
    bias = conv.bias
    if bias is None:  # never: bias=True is the default
        raise UnsupportedError("internal: Conv2d without a bias")
    with torch.no_grad():
        conv.weight.copy_(weight)
        bias.copy_(const(2) if len(inputs) > 2 and inputs[2] else torch.zeros(weight.shape[0]))
    builder.layers.append(conv)
    builder.last_absorbs = True
    out = conv(torch.zeros(1, *var.layout, dtype=torch.float64))
    var.shape = tuple(out.shape)
    var.layout = var.shape[1:]


def _reshape_variable(node: NodeProto, shape: Shape, constants: dict[str, Tensor]) -> Shape:
    """The new ONNX shape of a reshaping node; raises unless it keeps the element order."""
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
    """Convert ``graph`` (one input, one output) into a :class:`Converted` float64 module.

    ``opset`` is the model's default-domain opset version (0 when not declared).

    Raises:
        OnnxImportError: listing every node that cannot be converted and every initializer or
            ``Constant`` node the graph uses that holds NaN or inf.
    """
    problems: list[str] = []
    try:
        constants = {tensor.name: tensor_values(tensor) for tensor in graph.initializer}
    except UnsupportedError as error:
        raise OnnxImportError(source, [str(error)]) from error
    used = {name for node in graph.node for name in node.input}
    non_finite = [f"initializer {name!r}" for name, values in constants.items()
                  if name in used and not _finite(values)]
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
    onnx_shape = tuple(1 if d is None or d <= 0 else d for d in shape)
    layout = onnx_shape[1:] if len(onnx_shape) >= 2 and onnx_shape[0] == 1 else onnx_shape
    var: _Variable | None = _Variable(info.name, onnx_shape, layout or (1,))
    builder = _Builder(input_layout=layout or (1,))
    dead: set[str] = set()  # outputs of nodes that failed: skip what depends on them
    for node in _topological(graph.node, set(constants) | {info.name}):
        missing = [n for n in node.input if n and n not in constants and n not in dead
                   and (var is None or n != var.name)]
        if missing:
            problems.append(f"{label(node)}: uses {missing}, which no earlier node produces "
                            "(a branch of the graph, or nodes out of order)")
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
    if non_finite:
        problems.insert(0, f"NaN or inf values in {', '.join(non_finite)}: such a network "
                        "cannot be verified; fix or re-export it with finite weights")
    output = graph.output[0].name
    if var is not None and var.name != output and not problems:
        problems.append(f"the graph output {output!r} is not the end of the input-dependent "
                        f"chain (which ends at {var.name!r})")
    if problems or var is None:
        raise OnnxImportError(source, problems or ["the input-dependent chain is broken"])
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
    module = nn.Sequential(*builder.layers).to(torch.float64).eval()
    dtype = DTYPES.get(elem_type, torch.float32)
    order = None if builder.input_order is None else tuple(builder.input_order.tolist())
    return Converted(module, builder.input_layout, onnx_shape, var.shape, info.name, output, dtype,
                     order)


_KNOWN_OPS = frozenset({
    "Relu", "Identity", "Dropout", "Cast", "Add", "Sub", "Mul", "Div", "Neg",
    "BatchNormalization", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Gemm",
    "MatMul", "Conv", "AveragePool", "Constant", "Shape", "Gather", "Concat",
})
