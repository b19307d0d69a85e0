"""Converting an ONNX graph whose input-dependent values branch and join (residual
connections, concatenations) into a ``torch.fx.GraphModule``.

The chain converter (:mod:`tightrope.verify.onnx.convert`) handles graphs whose live values
form one chain; this one handles the rest. Each live value keeps the ONNX layout: a value of
ONNX shape ``S`` is the torch tensor ``(N, *S[1:])`` when ``S`` has a leading batch axis
(rank >= 2, size 1), else ``(N, *S)`` (:func:`per_sample`). Each node becomes ``call_module``
nodes of ``nn.Linear``, ``nn.Conv2d``, ``nn.ReLU``, ``nn.MaxPool2d``, ``nn.AvgPool2d``,
``nn.Flatten`` and ``tightrope.bounds.modules``' ``Add``, ``Concat``, ``Reshape``, ``Permute``,
``Pad`` and ``Elementwise``. Elementwise maps (Add/Sub/Mul/Div/Neg with a constant,
BatchNormalization) are then composed and folded into the Linear or (per channel) Conv layer
before them, or into the Linear layer after them, where that layer has no other user.
"""

from __future__ import annotations

import keyword
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from onnx import NodeProto
from torch import Tensor, fx, nn

from tightrope.bounds.modules import Add, Concat, Elementwise, Permute, Reshape
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
)
from tightrope.verify.onnx.layers import (
    conv_layer,
    conv_pads,
    pad_layer,
    pad_spec,
    pool_layer,
    reshaped,
    window_shape,
)

__all__ = ["convert_dag", "per_sample"]

F64 = torch.float64


def per_sample(shape: Shape) -> Shape:
    """The per-sample torch shape of a live value of ONNX shape ``shape``: without the leading
    batch axis when it has one (rank >= 2, size 1), else all of it."""
    return shape[1:] if len(shape) >= 2 and shape[0] == 1 else shape


@dataclass(frozen=True, slots=True)
class _Value:
    """A live value: the fx node that computes it, and its ONNX shape."""

    node: fx.Node
    shape: Shape

    @property
    def sample(self) -> Shape:
        return per_sample(self.shape)


@dataclass(slots=True)
class _Dag:
    constants: dict[str, Tensor]
    opset: int
    graph: fx.Graph = field(default_factory=fx.Graph)
    modules: dict[str, nn.Module] = field(default_factory=dict)
    values: dict[str, _Value] = field(default_factory=dict)

    def call(self, module: nn.Module, args: Sequence[fx.Node], hint: str,
             sample: Shape) -> fx.Node:
        """Append ``module`` (named after ``hint``) applied to ``args``; its output has the
        per-sample shape ``sample``."""
        base = re.sub(r"\W+", "_", hint).strip("_") or "layer"
        if not base[0].isalpha() or keyword.iskeyword(base):
            base = f"m_{base}"
        name, index = base, 1
        while name in self.modules:
            name, index = f"{base}_{index}", index + 1
        self.modules[name] = module
        node = self.graph.call_module(name, tuple(args))
        node.meta["sample"] = sample
        return node

    def const(self, node: NodeProto, index: int) -> Tensor:
        name = node.input[index] if index < len(node.input) else ""
        if not name:
            raise UnsupportedError(f"input {index} is missing")
        if name not in self.constants:
            raise UnsupportedError(f"input {index} ({name!r}) depends on the network input "
                                   "(it must be a constant)")
        return self.constants[name]

    def only_live(self, node: NodeProto) -> _Value:
        """The node's input 0, which must be its only input-dependent one."""
        if [n for n in node.input if n in self.values] != [node.input[0]]:
            raise UnsupportedError("only input 0 may depend on the network input")
        return self.values[node.input[0]]

    def set(self, node: NodeProto, value: fx.Node, shape: Shape) -> None:
        self.values[node.output[0]] = _Value(value, shape)

    def reshape(self, value: fx.Node, source: Shape, target: Shape, hint: str) -> fx.Node:
        """``value`` (per-sample shape ``source``) as per-sample shape ``target``."""
        if source == target:
            return value
        layer = nn.Flatten() if len(target) == 1 and source else Reshape(target)
        return self.call(layer, [value], hint, target)


def _name(node: NodeProto) -> str:
    """What the layers of ``node`` are named after: its name, or its first output."""
    return node.name or (node.output[0] if node.output else node.op_type)


def _elementwise(scale: Tensor | float, shift: Tensor | float) -> Elementwise:
    layer = Elementwise(0.0)
    layer.scale = torch.as_tensor(scale, dtype=F64).clone()
    layer.shift = torch.as_tensor(shift, dtype=F64).clone()
    return layer


def _sample_constant(value: Tensor, shape: Shape) -> Tensor:
    """A constant operand of a live value of ONNX shape ``shape``, to broadcast against the
    per-sample shape."""
    fits = value.dim() <= len(shape) and all(
        c in (1, d) for c, d in zip(reversed(value.shape), reversed(shape), strict=False))
    if not fits:
        raise UnsupportedError(f"a constant of shape {tuple(value.shape)} does not broadcast "
                               f"to the shape {shape} of the input-dependent value")
    value = value.to(F64)
    while value.dim() > len(per_sample(shape)):  # the batch axis (size 1)
        value = value[0]
    return value


def _affine(node: NodeProto, dag: _Dag, value: _Value, scale: Tensor, shift: Tensor) -> None:
    layer = _elementwise(_sample_constant(scale, value.shape),
                         _sample_constant(shift, value.shape))
    dag.set(node, dag.call(layer, [value.node], _name(node), value.sample), value.shape)


def _arithmetic(node: NodeProto, dag: _Dag) -> None:
    """Add, Sub, Mul, Div, Neg: of a live value by a constant, or Add/Sub of two."""
    op, inputs = node.op_type, list(node.input)
    positions = [i for i, n in enumerate(inputs[:2]) if n in dag.values]
    if len(positions) == 2:
        return _join(node, dag)
    position = positions[0]
    value = dag.values[inputs[position]]
    if op == "Neg":
        return _affine(node, dag, value, torch.tensor(-1.0), torch.tensor(0.0))
    other = dag.const(node, 1 - position).to(F64)
    zero, one = torch.zeros_like(other), torch.ones_like(other)
    if op == "Add":
        return _affine(node, dag, value, one, other)
    if op == "Sub":
        if position == 0:
            return _affine(node, dag, value, one, -other)
        return _affine(node, dag, value, -one, other)
    if op == "Mul":
        return _affine(node, dag, value, other, zero)
    if position == 1:
        raise UnsupportedError("division by the input-dependent value is not affine")
    if bool((other == 0).any()):
        raise UnsupportedError("division by a constant that has zeros")
    return _affine(node, dag, value, 1.0 / other, zero)


def _join(node: NodeProto, dag: _Dag) -> None:
    """Add or Sub of two live values: ``Add`` (after ``Elementwise(-1)`` for Sub)."""
    if node.op_type not in ("Add", "Sub"):
        raise UnsupportedError(f"{node.op_type} of two input-dependent values is not "
                               "supported (not piecewise linear)")
    a, b = dag.values[node.input[0]], dag.values[node.input[1]]
    if a.shape != b.shape:
        raise UnsupportedError(f"{node.op_type} of input-dependent values of shapes {a.shape} "
                               f"and {b.shape} (broadcasting between them is not supported)")
    second = b.node
    if node.op_type == "Sub":
        second = dag.call(_elementwise(-1.0, 0.0), [b.node], f"{_name(node)}_negate", b.sample)
    dag.set(node, dag.call(Add(), [a.node, second], _name(node), a.sample), a.shape)


def _batch_norm(node: NodeProto, dag: _Dag) -> None:
    value = dag.only_live(node)
    if len(value.shape) < 2:
        raise UnsupportedError(f"BatchNormalization needs (N, C, ...), got {value.shape}")
    if attr_int(node, "training_mode", 0):
        raise UnsupportedError("training_mode=1 (batch statistics) is not supported")
    gamma, beta, mean, variance = (dag.const(node, i).to(F64) for i in range(1, 5))
    scale = gamma / torch.sqrt(variance + attr_float(node, "epsilon", 1e-5))
    view = (1, -1, *([1] * (len(value.shape) - 2)))
    _affine(node, dag, value, scale.view(view), (beta - mean * scale).view(view))


def _linear(node: NodeProto, dag: _Dag, value: _Value, weight: Tensor, bias: Tensor | None,
            shape: Shape) -> None:
    """``Linear(weight: (m, n), bias: (m,))`` on the flattened value; the output has ONNX
    shape ``shape``."""
    m, n = weight.shape
    linear = nn.Linear(n, m, dtype=F64)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias if bias is not None else torch.zeros(m))
    flat = dag.reshape(value.node, value.sample, (n,), f"{_name(node)}_flatten")
    out = dag.call(linear, [flat], _name(node), (m,))
    dag.set(node, dag.reshape(out, (m,), per_sample(shape), f"{_name(node)}_reshape"), shape)


def _gemm(node: NodeProto, dag: _Dag) -> None:
    inputs = list(node.input)
    if [n for n in inputs if n in dag.values] != [inputs[0]] or attr_int(node, "transA", 0):
        raise UnsupportedError("Gemm with the input-dependent value as B or C, or with transA=1")
    value = dag.values[inputs[0]]
    matrix = dag.const(node, 1).to(F64)
    if attr_int(node, "transB", 0):
        matrix = matrix.T
    if matrix.dim() != 2 or value.shape != (1, matrix.shape[0]):
        raise UnsupportedError(f"Gemm of {value.shape} by {tuple(matrix.shape)}")
    m = matrix.shape[1]
    bias = None
    if len(inputs) > 2 and inputs[2]:
        bias = torch.broadcast_to(dag.const(node, 2).to(F64), (1, m)).reshape(m)
        bias = bias * attr_float(node, "beta", 1.0)
    _linear(node, dag, value, attr_float(node, "alpha", 1.0) * matrix.T, bias, (1, m))


def _matmul(node: NodeProto, dag: _Dag) -> None:
    positions = [i for i, n in enumerate(node.input[:2]) if n in dag.values]
    if len(positions) != 1:
        raise UnsupportedError("MatMul of two input-dependent values is not supported")
    position = positions[0]
    value = dag.values[node.input[position]]
    matrix = dag.const(node, 1 - position).to(F64)
    if matrix.dim() != 2:
        raise UnsupportedError(f"MatMul by a constant of rank {matrix.dim()} (need 2)")
    numel = math.prod(value.shape)
    if position == 0:  # x @ W acts on the last axis
        n = matrix.shape[0]
        if not value.shape or value.shape[-1] != n or numel != n:
            raise UnsupportedError(f"MatMul of {value.shape} by {tuple(matrix.shape)}")
        _linear(node, dag, value, matrix.T, None, (*value.shape[:-1], matrix.shape[1]))
        return
    n = matrix.shape[1]  # W @ x contracts the second-to-last axis (or the only one)
    vector = len(value.shape) == 1
    if numel != n or (not vector and value.shape[-2:] != (n, 1)):
        raise UnsupportedError(f"MatMul of {tuple(matrix.shape)} by {value.shape}")
    out = (matrix.shape[0],) if vector else (*value.shape[:-2], matrix.shape[0], 1)
    _linear(node, dag, value, matrix, None, out)


def _image(node: NodeProto, dag: _Dag) -> _Value:
    value = dag.only_live(node)
    if len(value.shape) != 4 or value.shape[0] != 1:
        raise UnsupportedError(f"needs a (1, C, H, W) input, got {value.shape}")
    return value


def _conv(node: NodeProto, dag: _Dag) -> None:
    """Conv -> ``nn.Conv2d``; asymmetric pads -> a zero ``Pad`` before it."""
    if [n for n in node.input if n in dag.values] != [node.input[0]]:
        raise UnsupportedError("Conv with input-dependent weights")
    value = _image(node, dag)
    weight = dag.const(node, 1).to(F64)
    bias = dag.const(node, 2) if len(node.input) > 2 and node.input[2] else None
    pads = conv_pads(node)
    symmetric = pads[:2] == pads[2:]
    conv = conv_layer(node, weight, bias, (pads[0], pads[1]) if symmetric else (0, 0))
    if conv.in_channels != value.shape[1]:
        raise UnsupportedError(f"Conv weight {tuple(weight.shape)} does not fit input "
                               f"{value.shape}")
    x = value.node
    if not symmetric:
        padded = (1, value.shape[1], value.shape[2] + pads[0] + pads[2],
                  value.shape[3] + pads[1] + pads[3])
        x = dag.call(pad_layer(pads[:2], pads[2:], 0.0), [x], f"{_name(node)}_pad", padded[1:])
    shape = window_shape(value.shape, conv.out_channels, conv.kernel_size, conv.stride, pads,
                         conv.dilation)
    dag.set(node, dag.call(conv, [x], _name(node), shape[1:]), shape)


def _pool(node: NodeProto, dag: _Dag) -> None:
    value = _image(node, dag)
    layer, shape = pool_layer(node, value.shape)
    dag.set(node, dag.call(layer, [value.node], _name(node), shape[1:]), shape)


def _pad(node: NodeProto, dag: _Dag) -> None:
    value = dag.only_live(node)
    begins, ends, fill = pad_spec(node, dag.constants, len(value.shape))
    skip = len(value.shape) - len(value.sample)  # 1: the batch axis, not padded
    if skip and (begins[0] or ends[0]):
        raise UnsupportedError("padding the batch axis is not supported")
    shape = tuple(d + b + e for d, b, e in zip(value.shape, begins, ends, strict=True))
    if shape == value.shape:
        dag.values[node.output[0]] = value
        return
    layer = pad_layer(begins[skip:], ends[skip:], fill)
    dag.set(node, dag.call(layer, [value.node], _name(node), per_sample(shape)), shape)


def _transpose(node: NodeProto, dag: _Dag) -> None:
    """Transpose -> ``Permute`` (or a reshape, when it keeps the element order)."""
    value = dag.only_live(node)
    perm = attr_ints(node, "perm") or tuple(reversed(range(len(value.shape))))
    shape = tuple(value.shape[axis] for axis in perm)
    numel = math.prod(value.shape)
    source = torch.arange(numel).reshape(value.shape).permute(*perm).reshape(-1)
    hint = _name(node)
    if bool((source == torch.arange(numel)).all()):
        x = dag.reshape(value.node, value.sample, per_sample(shape), hint)
    elif len(value.sample) < len(value.shape) and perm[0] == 0:  # keeps the batch axis
        x = dag.call(Permute([axis - 1 for axis in perm[1:]]), [value.node], hint, shape[1:])
    else:  # moves the batch axis: permute the whole ONNX value
        x = dag.reshape(value.node, value.sample, value.shape, f"{hint}_unbatch")
        x = dag.call(Permute(perm), [x], hint, shape)
        x = dag.reshape(x, shape, per_sample(shape), f"{hint}_batch")
    dag.set(node, x, shape)


def _reshape(node: NodeProto, dag: _Dag) -> None:
    value = dag.only_live(node)
    shape = reshaped(node, value.shape, dag.constants)
    dag.set(node, dag.reshape(value.node, value.sample, per_sample(shape), _name(node)), shape)


def _concat(node: NodeProto, dag: _Dag) -> None:
    names = [n for n in node.input if n]
    if any(n not in dag.values for n in names):
        raise UnsupportedError("Concat of input-dependent values with constants is not "
                               "supported")
    parts = [dag.values[n] for n in names]
    rank = len(parts[0].shape)
    axis = attr_int(node, "axis", 0)
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis < rank or any(
        len(p.shape) != rank or any(p.shape[i] != parts[0].shape[i]
                                    for i in range(rank) if i != axis) for p in parts):
        raise UnsupportedError(f"Concat on axis {axis} of shapes {[p.shape for p in parts]}")
    skip = rank - len(parts[0].sample)
    if skip and axis == 0:
        raise UnsupportedError("Concat along the batch axis is not supported")
    shape = tuple(sum(p.shape[axis] for p in parts) if i == axis else d
                  for i, d in enumerate(parts[0].shape))
    layer = Concat(axis - skip)
    dag.set(node, dag.call(layer, [p.node for p in parts], _name(node), per_sample(shape)), shape)


def _identity(node: NodeProto, dag: _Dag) -> None:
    if node.op_type == "Cast" and DTYPES.get(attr_int(node, "to", 1)) not in (
            torch.float32, torch.float64, torch.float16):
        raise UnsupportedError("Cast of the input-dependent value to a non-float type")
    dag.values[node.output[0]] = dag.only_live(node)


def _relu(node: NodeProto, dag: _Dag) -> None:
    value = dag.only_live(node)
    dag.set(node, dag.call(nn.ReLU(), [value.node], _name(node), value.sample), value.shape)


_HANDLERS: dict[str, Callable[[NodeProto, _Dag], None]] = {
    "Relu": _relu, "Identity": _identity, "Dropout": _identity, "Cast": _identity,
    "Add": _arithmetic, "Sub": _arithmetic, "Mul": _arithmetic, "Div": _arithmetic,
    "Neg": _arithmetic, "BatchNormalization": _batch_norm, "Gemm": _gemm, "MatMul": _matmul,
    "Conv": _conv, "MaxPool": _pool, "AveragePool": _pool, "GlobalAveragePool": _pool,
    "Pad": _pad, "Transpose": _transpose, "Flatten": _reshape, "Reshape": _reshape,
    "Squeeze": _reshape, "Unsqueeze": _reshape, "Concat": _concat,
}
_KNOWN_OPS = frozenset({*_HANDLERS, "Constant", "Shape", "Gather"})


def _needed(nodes: Sequence[NodeProto], output: str) -> list[NodeProto]:
    """The nodes ``output`` depends on (``nodes`` in topological order)."""
    wanted = {output}
    kept: list[NodeProto] = []
    for node in reversed(nodes):
        if any(name in wanted for name in node.output):
            kept.append(node)
            wanted.update(node.input)
    return kept[::-1]


def _step(node: NodeProto, dag: _Dag, non_finite: list[str]) -> None:
    """Convert one node: fold it if its inputs are constants, else add its layers."""
    op = node.op_type
    if op == "Constant":
        value = constant_of(node.attribute[0])
        dag.constants[node.output[0]] = value
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            non_finite.append(f"{label(node)} (output {node.output[0]!r})")
    elif op == "Shape" and node.input[0] in dag.values:
        shape = dag.values[node.input[0]].shape
        start, end = attr_int(node, "start", 0), attr_int(node, "end", len(shape))
        dag.constants[node.output[0]] = torch.tensor(shape[start:end], dtype=torch.int64)
    elif not any(name in dag.values for name in node.input):
        args = [dag.constants[n] for n in node.input if n]
        dag.constants[node.output[0]] = fold_constant(node, args, dag.opset)
    elif op in _HANDLERS:
        _HANDLERS[op](node, dag)
    else:
        raise UnsupportedError(f"operator {op} is not supported")


def convert_dag(nodes: Sequence[NodeProto], constants: dict[str, Tensor], non_finite: list[str],
                input_name: str, input_shape: Shape, output: str,
                opset: int) -> tuple[fx.GraphModule | None, Shape, list[str]]:
    """Convert the graph ``nodes`` (topologically sorted) from ``input_name`` (ONNX shape
    ``input_shape``) to ``output`` into a float64 GraphModule mapping ``(N, *per_sample(
    input_shape))`` to ``(N, prod(output shape))``, and the output's ONNX shape; or ``None``
    and why not.

    ``constants`` (the initializers) gains the folded values; ``non_finite`` gains the
    ``Constant`` nodes that hold NaN or inf.
    """
    if not input_shape:
        return None, (), [f"the input {input_name!r} is a scalar (a graph with branches needs "
                          "a tensor input)"]
    dag = _Dag(dict(constants), opset)
    placeholder = dag.graph.placeholder("x")
    placeholder.meta["sample"] = per_sample(input_shape)
    dag.values[input_name] = _Value(placeholder, input_shape)
    problems: list[str] = []
    dead: set[str] = set()  # outputs of nodes that failed: skip what depends on them
    for node in _needed(nodes, output):
        known = dag.constants.keys() | dag.values.keys() | dead
        missing = [n for n in node.input if n and n not in known]
        if missing:
            problems.append(f"{label(node)}: uses {missing}, which no earlier node produces "
                            "(nodes in a cycle, or a name nothing defines)")
            dead.update(node.output)
        elif any(n in dead for n in node.input):
            if node.op_type not in _KNOWN_OPS:
                problems.append(f"{label(node)}: operator {node.op_type} is not supported")
            dead.update(node.output)
        else:
            try:
                _step(node, dag, non_finite)
            except (UnsupportedError, RuntimeError, IndexError, KeyError, TypeError,
                    ValueError) as error:
                problems.append(f"{label(node)}: {error}")
                dead.update(node.output)
    if problems or non_finite:
        return None, (), problems
    if output not in dag.values:
        return None, (), [f"the graph output {output!r} does not depend on the input"]
    value = dag.values[output]
    flat = (math.prod(value.shape),)
    dag.graph.output(dag.reshape(value.node, value.sample, flat, "flatten_output"))
    _fold_affine(dag)
    dag.graph.lint()
    module = fx.GraphModule(dag.modules, dag.graph)
    return module.to(F64).eval(), value.shape, []


def _module(dag: _Dag, node: object) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module" and isinstance(node.target, str):
        return dag.modules[node.target]
    return None


def _fold_affine(dag: _Dag) -> None:
    """Compose consecutive Elementwise layers, fold them into the Linear or Conv2d layer
    before (or else the Linear layer after) them when that layer has no other user, and drop
    identities."""
    for node in list(dag.graph.nodes):
        layer = _module(dag, node)
        if not isinstance(layer, Elementwise):
            continue
        source = node.args[0]
        assert isinstance(source, fx.Node)
        before = _module(dag, source)
        if (before is not None and len(source.users) == 1
                and _fold_into(before, layer, node.meta["sample"])) or _is_identity(layer):
            node.replace_all_uses_with(source)
            dag.graph.erase_node(node)
    for node in list(dag.graph.nodes):
        layer = _module(dag, node)
        users = list(node.users)
        after = _module(dag, users[0]) if len(users) == 1 else None
        if (isinstance(layer, Elementwise) and isinstance(after, nn.Linear)
                and len(node.meta["sample"]) == 1):
            _fold_forward(layer, after, node.meta["sample"])
            source = node.args[0]
            assert isinstance(source, fx.Node)
            node.replace_all_uses_with(source)
            dag.graph.erase_node(node)


def _is_identity(layer: Elementwise) -> bool:
    return bool((layer.scale == 1).all()) and bool((layer.shift == 0).all())


def _fold_into(before: nn.Module, layer: Elementwise, sample: Shape) -> bool:
    """Fold ``layer`` (acting on the output of ``before``, per-sample shape ``sample``) into
    ``before`` if it can take it."""
    scale = torch.broadcast_to(layer.scale, sample)
    shift = torch.broadcast_to(layer.shift, sample)
    with torch.no_grad():
        if isinstance(before, Elementwise):
            before.scale, before.shift = (before.scale * layer.scale,
                                          before.shift * layer.scale + layer.shift)
            return True
        if isinstance(before, nn.Conv2d):
            grid_scale, grid_shift = scale.reshape(sample[0], -1), shift.reshape(sample[0], -1)
            if not (bool((grid_scale == grid_scale[:, :1]).all())
                    and bool((grid_shift == grid_shift[:, :1]).all())):
                return False
            scale, shift = grid_scale[:, 0], grid_shift[:, 0]
        elif not isinstance(before, nn.Linear):
            return False
        bias = before.bias
        if bias is None:  # never: the converter creates layers with a bias
            return False
        before.weight.mul_(scale.reshape(-1, *([1] * (before.weight.dim() - 1))))
        bias.mul_(scale).add_(shift)
    return True


def _fold_forward(layer: Elementwise, after: nn.Linear, sample: Shape) -> None:
    """Fold ``layer`` into the Linear layer ``after`` it: ``W (s x + t) + b``."""
    scale = torch.broadcast_to(layer.scale, sample)
    shift = torch.broadcast_to(layer.shift, sample)
    with torch.no_grad():
        if after.bias is not None:
            after.bias.add_(after.weight @ shift)
        after.weight.mul_(scale[None, :])
