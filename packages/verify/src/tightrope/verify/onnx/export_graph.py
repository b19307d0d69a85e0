"""Writing a traced (non-chain) model as ONNX, node by node: the graph half of :func:`export_onnx`.

The model is traced as :func:`tightrope.bounds.lower` traces it (``torch.fx``, supported layers
as leaves) and evaluated on a reference batch of two zero samples, which fixes every value's
shape and the constants (``x.size(0)``, parameters). Each node that depends on the input becomes
ONNX operators: a layer as in a chain (:class:`~tightrope.verify.onnx.export._Emitter`),
MaxPool2d -> MaxPool, the modules of :mod:`tightrope.bounds.modules` (Add, Concat, Reshape ->
Reshape, Permute -> Transpose, Pad, Elementwise -> Mul + Add), and the functions ``relu``,
``+ - * /`` and unary ``-`` (with constants as initializers), ``torch.cat`` -> Concat,
``flatten``/``view``/``reshape``/``squeeze``/``unsqueeze`` -> Reshape (``[-1, *sample]``),
``permute``/``transpose`` -> Transpose; ``contiguous`` is dropped. Anything else is refused.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from tightrope.bounds.modules import Add as AddModule
from tightrope.bounds.modules import Concat as ConcatModule
from tightrope.bounds.modules import Elementwise, Pad, Permute
from tightrope.bounds.modules import Reshape as ReshapeModule
from tightrope.bounds.trace import (
    ADD,
    CAT,
    DIV,
    MUL,
    NEG,
    PERMUTE,
    RELU,
    RESHAPE,
    SUB,
    attribute_of,
    evaluate_node,
    node_key,
    node_permutation,
    traced_graph,
)

if TYPE_CHECKING:
    from tightrope.verify.onnx.export import _Emitter

__all__ = ["GRAPH_ONLY_LAYERS", "export_graph"]

#: Layers only the graph exporter writes (an ``nn.Sequential`` holding one is traced).
GRAPH_ONLY_LAYERS: tuple[type[nn.Module], ...] = (
    nn.MaxPool2d, AddModule, ConcatModule, ReshapeModule, Permute, Pad, Elementwise)

_BATCH = 2  # reference samples: a reshape that mixes samples changes the batch size


@dataclass
class _State:
    emitter: _Emitter
    model: nn.Module
    opset: int
    #: The ONNX value name of each node that depends on the input ("" when refused).
    names: dict[fx.Node, str] = field(default_factory=dict)
    #: Each node's value on the reference batch.
    values: dict[fx.Node, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    count: int = 0

    def refuse(self, node: fx.Node, why: str = "") -> None:
        detail = f": {why}" if why else ""
        self.problems.append(
            f"cannot export node '{node.name}' ({_qualified(self.model, node)}) to ONNX{detail}")


def export_graph(emitter: _Emitter, model: nn.Module, input_shape: tuple[int, ...],
                 opset: int) -> tuple[str, tuple[int, ...]]:
    """Emit the traced ``model`` into ``emitter``; returns the output's name and shape
    ``(1, *S_out)``.

    Raises:
        TypeError: naming every node that has no ONNX equivalent here, at once.
    """
    graph = traced_graph(model)
    tensors = [*model.parameters(), *model.buffers()]
    floats = [t for t in tensors if t.is_floating_point()]
    x = torch.zeros(_BATCH, *input_shape, dtype=floats[0].dtype if floats else emitter.dtype)
    state = _State(emitter, model, opset)
    output: Any = None
    with torch.no_grad():
        for node in graph.nodes:
            if node.op == "output":
                output = node.args[0]
            else:
                _visit(state, node, x)
    if not state.problems and not (isinstance(output, fx.Node) and output in state.names):
        state.problems.append("the model must return one tensor that depends on its input")
    if state.problems:
        raise TypeError(f"export_onnx cannot write {type(model).__name__}: "
                        + "; ".join(state.problems))
    assert isinstance(output, fx.Node)
    return state.names[output], (1, *state.values[output].shape[1:])


def _visit(state: _State, node: fx.Node, x: Tensor) -> None:
    """Evaluate ``node`` on the reference batch and emit it when it depends on the input."""
    if node.op == "placeholder":
        if state.names:
            state.refuse(node, "a second input")
        state.names[node] = "input"
        state.values[node] = x
        return
    args = fx.node.map_arg(node.args, lambda n: state.values[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: state.values[n])
    if node.op == "get_attr":
        state.values[node] = attribute_of(state.model, str(node.target))
        return
    result = evaluate_node(state.model, node, args, kwargs)
    state.values[node] = result
    sources = [n for n in node.all_input_nodes if n in state.names]
    if not sources:
        return  # a constant
    if not isinstance(result, Tensor):
        if _holds_tensor(result):
            state.refuse(node, "its result is not one tensor")
            state.names[node] = ""
        return  # a size: a constant of the (fixed) shapes
    if result.dim() == 0 or result.shape[0] != x.shape[0]:
        state.refuse(node, "its result is not a batch of samples")
        state.names[node] = ""
        return
    name = _emit(state, node, sources, result)
    state.names[node] = "" if name is None else name


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    return isinstance(value, dict)


def _qualified(model: nn.Module, node: fx.Node) -> str:
    """The function, method or layer a node calls, as its user wrote it (``torch.sigmoid``)."""
    if node.op == "call_module":
        return f"{node.target}: {type(model.get_submodule(str(node.target))).__name__}"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    name = getattr(target, "__name__", repr(target))
    for prefix, namespace in (("torch", torch), ("torch.nn.functional", F),
                              ("operator", operator)):
        if getattr(namespace, name, None) is target:
            return f"{prefix}.{name}"
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module else name


def _emit(state: _State, node: fx.Node, sources: list[fx.Node], result: Tensor) -> str | None:
    """The operators of a node that depends on the input; returns its value (None: refused)."""
    index = state.count
    state.count += 1
    out = f"t{index}"
    if node.op == "call_module":
        return _emit_module(state, node, index, result)
    source = state.names[sources[0]]
    key = node_key(node)
    if key in RELU and len(sources) == 1:
        state.emitter.node("Relu", [source], out, node.name)
    elif key in ADD | SUB | MUL | DIV | NEG:
        return _emit_arithmetic(state, node, index)
    elif key in RESHAPE and len(sources) == 1:
        _reshape(state, source, index, result, node.name)
    elif key in PERMUTE and len(sources) == 1:
        return _emit_permute(state, node, index, source)
    elif key == "contiguous":
        return source
    elif key in CAT:
        return _emit_cat(state, node, index, result)
    else:
        state.refuse(node)
        return None
    return out


def _reshape(state: _State, source: str, index: int, result: Tensor, name: str) -> str:
    shape = state.emitter.ints(f"v{index}_shape", [-1, *result.shape[1:]])
    state.emitter.node("Reshape", [source, shape], f"t{index}", name)
    return f"t{index}"


def _emit_module(state: _State, node: fx.Node, index: int, result: Tensor) -> str | None:
    module = state.model.get_submodule(str(node.target))
    live = [a for a in node.args if isinstance(a, fx.Node) and a in state.names]
    if len(live) != len(node.args) or node.kwargs:
        state.refuse(node, "every argument must depend on the input")
        return None
    inputs = [state.names[a] for a in live]
    emitter, out, name = state.emitter, f"t{index}", node.name
    if isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) != (1, -1):
        return _reshape(state, inputs[0], index, result, name)
    if isinstance(module, nn.MaxPool2d):
        return _max_pool(state, node, module, index, inputs[0])
    if isinstance(module, AddModule) and len(inputs) == 2:
        emitter.node("Add", inputs, out, name)
    elif isinstance(module, ConcatModule):
        emitter.node("Concat", inputs, out, name, axis=module.dim + 1)
    elif isinstance(module, ReshapeModule):
        return _reshape(state, inputs[0], index, result, name)
    elif isinstance(module, Permute):
        emitter.node("Transpose", inputs, out, name, perm=[0, *(d + 1 for d in module.dims)])
    elif isinstance(module, Pad):
        _pad(state, module, index, inputs[0], (name, state.values[live[0]].dim()))
    elif isinstance(module, Elementwise):
        rank = state.values[live[0]].dim()
        scale = emitter.constant(f"v{index}_scale", _broadcast(module.scale, rank))
        shift = emitter.constant(f"v{index}_shift", _broadcast(module.shift, rank))
        emitter.node("Mul", [inputs[0], scale], f"v{index}_scaled", f"{name}_mul")
        emitter.node("Add", [f"v{index}_scaled", shift], out, f"{name}_add")
    else:
        why = emitter.layer(module, index, inputs[0], out, state.values[live[0]].dim())
        if why is not None:
            state.refuse(node, f"no operator for {why}")
            return None
    return out


def _broadcast(value: Tensor, rank: int) -> Tensor:
    """A per-sample constant with leading unit axes up to ``rank`` (batch included)."""
    return value.reshape((1,) * max(rank - value.dim(), 0) + tuple(value.shape))


def _max_pool(state: _State, node: fx.Node, module: nn.MaxPool2d, index: int,
              source: str) -> str | None:
    if module.ceil_mode or module.return_indices:
        state.refuse(node, "ceil_mode and return_indices are not written")
        return None
    from tightrope.verify.onnx.export import _pair

    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride if module.stride is not None else module.kernel_size)
    pad, dilation = _pair(module.padding), _pair(module.dilation)
    extra: dict[str, Any] = {} if dilation == (1, 1) else {"dilations": list(dilation)}
    state.emitter.node("MaxPool", [source], f"t{index}", node.name, kernel_shape=list(kernel),
                       strides=list(stride), pads=[*pad, *pad], **extra)
    return f"t{index}"


def _pad(state: _State, module: Pad, index: int, source: str, at: tuple[str, int]) -> None:
    """``F.pad`` order (last dimension first, begin/end pairs) -> ONNX's (all begins, then all
    ends, first dimension first)."""
    name, rank = at
    begins, ends = [0] * rank, [0] * rank
    for k in range(len(module.pads) // 2):
        begins[rank - 1 - k], ends[rank - 1 - k] = module.pads[2 * k], module.pads[2 * k + 1]
    emitter = state.emitter
    if state.opset >= 11:
        pads = emitter.ints(f"v{index}_pads", begins + ends)
        value = emitter.constant(f"v{index}_value", torch.tensor(module.value))
        emitter.node("Pad", [source, pads, value], f"t{index}", name, mode="constant")
    else:
        emitter.node("Pad", [source], f"t{index}", name, mode="constant", pads=begins + ends,
                     value=module.value)


def _operand(state: _State, value: Any, name: str) -> str:
    """The ONNX name of an operand: a live value's, or a new initializer for a constant."""
    if isinstance(value, fx.Node) and value in state.names:
        return state.names[value]
    constant = state.values[value] if isinstance(value, fx.Node) else value
    return state.emitter.constant(name, torch.as_tensor(constant))


def _emit_arithmetic(state: _State, node: fx.Node, index: int) -> str | None:
    key, out, args = node_key(node), f"t{index}", list(node.args)
    if key in NEG and len(args) == 1 and not node.kwargs:
        state.emitter.node("Neg", [_operand(state, args[0], "")], out, node.name)
        return out
    if len(args) != 2 or node.kwargs:
        state.refuse(node, "only two operands, no keyword arguments")
        return None
    live = [isinstance(a, fx.Node) and a in state.names for a in args]
    op = ("Add" if key in ADD else "Sub" if key in SUB else "Mul" if key in MUL
          else "Div" if key in DIV else "")
    if not op or (all(live) and op in ("Mul", "Div")) or (op == "Div" and live[1]):
        state.refuse(node, "not linear in the input")
        return None
    inputs = [_operand(state, a, f"v{index}_{k}") for k, a in enumerate(args)]
    state.emitter.node(op, inputs, out, node.name)
    return out


def _emit_permute(state: _State, node: fx.Node, index: int, source: str) -> str | None:
    dims = node_permutation(node, state.values[node.all_input_nodes[0]].dim())
    if dims[0] != 0:
        state.refuse(node, "a permutation that moves the batch dimension")
        return None
    state.emitter.node("Transpose", [source], f"t{index}", node.name, perm=dims)
    return f"t{index}"


def _emit_cat(state: _State, node: fx.Node, index: int, result: Tensor) -> str | None:
    args: tuple[Any, ...] = tuple(node.args)
    parts = args[0]
    dim = int(node.kwargs.get("dim", args[1] if len(args) > 1 else 0))  # type: ignore[arg-type]
    dim %= result.dim()
    if not isinstance(parts, (list, tuple)) or dim == 0:
        state.refuse(node, "torch.cat along the batch dimension")
        return None
    if not all(isinstance(p, fx.Node) and p in state.names for p in parts):
        state.refuse(node, "torch.cat of constants and values that depend on the input")
        return None
    state.emitter.node("Concat", [state.names[p] for p in parts], f"t{index}", node.name,
                       axis=dim)
    return f"t{index}"
