"""Lowering any traceable PyTorch model to the graph form (:class:`~tightrope.bounds.Network`).

An ``nn.Sequential`` tree of layers lowers directly to a chain (:func:`tightrope.bounds.lower`).
Any other model, e.g. one with residual blocks whose ``forward`` adds a shortcut, is traced with
``torch.fx`` and each node of the trace becomes an op:

* a call of a supported layer (``supported_layers()``): its rule, as in a chain;
* ``relu`` (``torch.relu``, ``F.relu``, ``Tensor.relu``): :class:`Relu`;
* ``+`` / ``-`` of two values that depend on the input: :class:`Add` (a difference negates its
  second operand first); ``+ - * /`` and unary ``-`` with a constant: an elementwise affine map;
* ``torch.cat``: :class:`Concat`; ``flatten``, ``view``, ``reshape``, ``squeeze``,
  ``unsqueeze``: a reshape of each sample; ``permute``/``transpose`` of per-sample dimensions;
  ``contiguous``: nothing.

Shapes are found by evaluating the trace on a reference batch, and anything that mixes samples
(a reshape across the batch dimension, a join along it) is refused, as is every other function,
each named in one error.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from tightrope.bounds.modules import Add as AddModule
from tightrope.bounds.modules import Concat as ConcatModule
from tightrope.bounds.modules import Elementwise, Permute, Reshape
from tightrope.bounds.network import (
    Add,
    Affine,
    Concat,
    Network,
    Op,
    Relu,
    _behaves_as,
    _find_rule,
    _supports,
    _why_unsupported,
    max_pool_op,
    supported_layers,
)

__all__ = [
    "ADD",
    "CAT",
    "DIV",
    "MUL",
    "NEG",
    "PERMUTE",
    "RELU",
    "RESHAPE",
    "SUB",
    "attribute_of",
    "evaluate_node",
    "lower_traced",
    "node_key",
    "node_permutation",
    "traced_graph",
]

RELU = {torch.relu, F.relu, "relu"}
ADD = {operator.add, torch.add, "add", operator.iadd}
SUB = {operator.sub, torch.sub, "sub", operator.isub}
MUL = {operator.mul, torch.mul, "mul", operator.imul}
DIV = {operator.truediv, torch.div, "div", operator.itruediv}
NEG = {operator.neg, torch.neg, "neg"}
RESHAPE = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
            "flatten", "view", "reshape", "squeeze", "unsqueeze"}
PERMUTE = {torch.permute, torch.transpose, "permute", "transpose"}
CAT = {torch.cat, torch.concat, torch.concatenate}


class _Tracer(fx.Tracer):
    """Traces through containers and stops at layers: any module without children, and every
    module with a rule (whose own ``forward`` is the function the rule describes)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _supports(m) or not list(m.children())


@dataclass
class _Builder:
    """The graph under construction; ``live[node]`` is the value a traced node computes."""

    model: nn.Module
    #: Whether the reference batch only fixes shapes (no BatchNorm on batch statistics): then a
    #: layer whose rule declares its output shape is not evaluated.
    shapes_only: bool = False
    ops: list[Op] = field(default_factory=list)
    inputs: list[tuple[int, ...]] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    live: dict[fx.Node, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add(self, op: Op, inputs: tuple[int, ...], result: Tensor) -> int:
        self.ops.append(op)
        self.inputs.append(inputs)
        self.shapes.append(tuple(result.shape[1:]))
        return len(self.ops)

    def affine(self, module: nn.Module, source: int, reference: Tensor, name: str) -> int:
        rule = _find_rule(module)
        assert rule is not None
        affine = rule(module, reference)
        op = Affine(**{**_fields(affine), "name": f"{name} ({affine.name})"})
        return self.add(op, (source,), affine.apply(reference))


def _fields(affine: Affine) -> dict[str, Any]:
    return {name: getattr(affine, name) for name in Affine.__dataclass_fields__}


def lower_traced(model: nn.Module, reference: Tensor) -> Network:
    """Lower ``model`` (any module ``torch.fx`` can trace) to a :class:`Network`.

    Args:
        reference: ``(N, *S_in)`` inputs of a clean forward pass that fixes the shapes and
            BatchNorm's batch statistics in train mode (an empty batch: the shapes only).

    Raises:
        TypeError: listing every node of the trace that has no op, at once.
    """
    graph = traced_graph(model)
    # Shapes come from a concrete pass; two samples at least, so that a reshape that mixes
    # samples cannot pass for one that keeps them.
    shapes_only = reference.shape[0] == 0
    if reference.shape[0] < 2:
        reference = reference.new_zeros((2, *reference.shape[1:]))
    builder = _Builder(model, shapes_only, shapes=[tuple(reference.shape[1:])])
    values: dict[fx.Node, Any] = {}
    output: fx.Node | None = None
    for node in graph.nodes:
        if node.op == "output":
            output = node.args[0] if isinstance(node.args[0], fx.Node) else None
            if output is None or output not in builder.live:
                builder.problems.append("the model must return one tensor that depends on "
                                        "its input")
            continue
        values[node] = _visit(builder, node, values, reference)
    if builder.problems:
        names = ", ".join(t.__name__ for t in supported_layers())
        raise TypeError(
            f"tightrope.bounds cannot lower {type(model).__name__}: "
            + "; ".join(builder.problems)
            + f". Supported layers: {names}; functions: relu, + - * / with constants, + - of "
            "two branches, torch.cat, flatten/view/reshape/permute of each sample. Register a "
            "rule with tightrope.bounds.affine_rule for another affine layer."
        )
    assert output is not None
    if builder.live[output] != len(builder.ops):
        raise TypeError("tightrope.bounds: the model's output must be its last computed value")
    inputs = tuple(builder.inputs)
    chain = all(ins == (i,) for i, ins in enumerate(inputs))
    return Network(ops=tuple(builder.ops), shapes=tuple(builder.shapes),
                   like=reference.new_empty(0), inputs=None if chain else inputs)


#: The trace of each model, with the module types it was traced with: tracing costs a few
#: milliseconds per call (as much as IBP on a small residual network), and a model's code
#: does not change between calls. A model whose modules were replaced since is traced afresh.
_TRACES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[tuple[str, type], ...], fx.Graph]] = (
    weakref.WeakKeyDictionary())


def traced_graph(model: nn.Module) -> fx.Graph:
    """The ``torch.fx`` graph of ``model`` with dead code removed (cached per model)."""
    layout = tuple((name, type(module)) for name, module in model.named_modules())
    found = _TRACES.get(model)
    if found is not None and found[0] == layout:
        return found[1]
    try:
        graph = fx.GraphModule(model, _Tracer().trace(model)).graph
    except Exception as error:  # fx raises many types for untraceable code
        raise TypeError(
            f"tightrope.bounds cannot trace {type(model).__name__} with torch.fx ({error}); "
            "write its forward without data-dependent control flow, or as nn.Sequential"
        ) from error
    graph.eliminate_dead_code()
    _TRACES[model] = (layout, graph)
    return graph


def _visit(builder: _Builder, node: fx.Node, values: dict[fx.Node, Any],
           reference: Tensor) -> Any:
    """Evaluate ``node`` on the reference batch and, when it depends on the input, add its op."""
    if node.op == "placeholder":
        if builder.live:
            builder.problems.append(f"{node.name}: a second input")
            return None
        builder.live[node] = 0
        return reference
    args = fx.node.map_arg(node.args, lambda n: values[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
    if node.op == "get_attr":
        return attribute_of(builder.model, str(node.target))
    result = _declared(builder, node, args) if builder.shapes_only else None
    if result is None:
        result = evaluate_node(builder.model, node, args, kwargs)
    sources = [n for n in node.all_input_nodes if n in builder.live]
    if not sources:
        return result  # a constant (parameters, shapes)
    if not isinstance(result, Tensor) or result.dim() == 0 or result.shape[0] != reference.shape[0]:
        builder.problems.append(f"{node.name} ({_target_name(node)}): its result is not a "
                                "batch of samples")
        return result
    index = _lower_node(builder, node, sources, values, result)
    # A refused node still depends on the input: its readers are checked too (value -1 marks
    # it; the network is never built when anything was refused).
    builder.live[node] = -1 if index is None else index
    return result


def _declared(builder: _Builder, node: fx.Node, args: Any) -> Tensor | None:
    """Zeros of the output shape an affine layer's rule declares, in place of its forward pass
    when the reference values are only there for the shapes (``None``: evaluate it)."""
    if node.op != "call_module" or len(args) != 1 or not isinstance(args[0], Tensor):
        return None
    module = builder.model.get_submodule(str(node.target))
    rule = _find_rule(module)
    if rule is None:
        return None
    shape = rule(module, args[0]).out_shape
    return None if shape is None else args[0].new_zeros((args[0].shape[0], *shape))


def evaluate_node(model: nn.Module, node: fx.Node, args: Any, kwargs: Any) -> Any:
    """What a ``call_module``/``call_method``/``call_function`` node computes on ``args``."""
    if node.op == "call_module":
        return model.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    target: Callable[..., Any] = node.target  # type: ignore[assignment]
    return target(*args, **kwargs)


def attribute_of(model: nn.Module, target: str) -> Any:
    """The attribute ``target`` (a dotted path) of ``model``: a ``get_attr`` node's value."""
    found: Any = model
    for part in target.split("."):
        found = getattr(found, part)
    return found


def _target_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def node_key(node: fx.Node) -> object:
    """The key of a node in the function groups (``ADD``, ``RELU``, ...): its target, or its
    method's name."""
    return node.target if node.op != "call_method" else str(node.target)


def _lower_node(builder: _Builder, node: fx.Node, sources: list[fx.Node],
                values: dict[fx.Node, Any], result: Tensor) -> int | None:
    """The op(s) for a node that depends on the input; returns its value (None: refused)."""
    first = builder.live[sources[0]]
    reference = values[sources[0]]
    if node.op == "call_module":
        return _lower_module(builder, node, [builder.live[s] for s in sources], values, result)
    key = node_key(node)
    if key in RELU and len(sources) == 1:
        return builder.add(Relu(name=node.name), (first,), result)
    if key in ADD | SUB | MUL | DIV | NEG:
        return _lower_arithmetic(builder, node, sources, values, result)
    if key in RESHAPE:
        return builder.affine(Reshape(result.shape[1:]), first, reference, node.name)
    if key in PERMUTE:
        return _lower_permute(builder, node, reference, result)
    if key == "contiguous":
        return first
    if key in CAT:
        return _lower_cat(builder, node, values, result)
    builder.problems.append(f"{node.name}: no op for {_target_name(node)}")
    return None


def _lower_module(builder: _Builder, node: fx.Node, inputs: list[int],
                  values: dict[fx.Node, Any], result: Tensor) -> int | None:
    module = builder.model.get_submodule(str(node.target))
    name = str(node.target)
    live_args = [a for a in node.args if isinstance(a, fx.Node) and a in builder.live]
    if len(live_args) != len(node.args) or node.kwargs:
        builder.problems.append(f"{name} ({type(module).__name__}): every argument must depend "
                                "on the input")
        return None
    if not _supports(module):
        builder.problems.append(f"{name} ({type(module).__name__}{_why_unsupported(module)})")
        return None
    if _behaves_as(module, nn.ReLU):
        return builder.add(Relu(name=name), (inputs[0],), result)
    if _behaves_as(module, nn.MaxPool2d):
        return builder.add(max_pool_op(module, name), (inputs[0],), result)  # type: ignore[arg-type]
    if _behaves_as(module, AddModule):
        return builder.add(Add(name=name), (inputs[0], inputs[1]), result)
    if _behaves_as(module, ConcatModule):
        return builder.add(Concat(dim=module.dim, name=name), tuple(inputs), result)  # type: ignore[arg-type]
    return builder.affine(module, inputs[0], values[live_args[0]], name)


def _lower_arithmetic(builder: _Builder, node: fx.Node, sources: list[fx.Node],
                      values: dict[fx.Node, Any], result: Tensor) -> int | None:
    key = node_key(node)
    operands: list[Any] = list(node.args)
    if key in NEG:
        return _scaled(builder, node, operands[0], values, -1.0, 0.0)
    if len(operands) != 2 or node.kwargs:
        builder.problems.append(f"{node.name} ({_target_name(node)}): only two operands, no "
                                "keyword arguments")
        return None
    a, b = operands
    a_live = isinstance(a, fx.Node) and a in builder.live
    b_live = isinstance(b, fx.Node) and b in builder.live
    if a_live and b_live:
        if key not in ADD | SUB:
            builder.problems.append(f"{node.name} ({_target_name(node)}): a product or quotient "
                                    "of two values that depend on the input is not linear")
            return None
        assert isinstance(a, fx.Node)
        assert isinstance(b, fx.Node)
        second = builder.live[b]
        if key in SUB:
            second = _scaled(builder, node, b, values, -1.0, 0.0)
        return builder.add(Add(name=node.name), (builder.live[a], second), result)
    live, constant = (a, values.get(b, b) if isinstance(b, fx.Node) else b) if a_live else (
        b, values.get(a, a) if isinstance(a, fx.Node) else a)
    if key in ADD:
        return _scaled(builder, node, live, values, 1.0, constant)
    if key in SUB:
        return (_scaled(builder, node, live, values, 1.0, -constant) if a_live
                else _scaled(builder, node, live, values, -1.0, constant))
    if key in MUL:
        return _scaled(builder, node, live, values, constant, 0.0)
    if not a_live:
        builder.problems.append(f"{node.name}: dividing by a value that depends on the input")
        return None
    return _scaled(builder, node, live, values, 1.0 / constant, 0.0)


def _scaled(builder: _Builder, node: fx.Node, live: Any, values: dict[fx.Node, Any],
            scale: Any, shift: Any) -> int:
    """The value of ``live * scale + shift`` (constants broadcast against each sample)."""
    reference: Tensor = values[live]
    per_sample = [_per_sample(c, reference) for c in (scale, shift)]
    module = Elementwise(per_sample[0], per_sample[1])
    return builder.affine(module, builder.live[live], reference, node.name)


def _per_sample(constant: Any, reference: Tensor) -> Tensor:
    """``constant`` as a tensor that broadcasts against one sample of ``reference``."""
    value = torch.as_tensor(constant, dtype=reference.dtype, device=reference.device)
    if value.dim() > reference.dim() - 1:
        if value.dim() > reference.dim() or value.shape[0] != 1:
            raise TypeError(f"a constant of shape {tuple(value.shape)} varies across the batch "
                            f"of a value of shape {tuple(reference.shape)}")
        value = value[0]
    return value


def node_permutation(node: fx.Node, rank: int) -> list[int]:
    """The dimension order (batch included) of a ``permute``/``transpose`` node on a value of
    ``rank`` dimensions."""
    args: tuple[Any, ...] = tuple(node.args)
    if node_key(node) in ("permute", torch.permute):
        given = args[1:] if node_key(node) == "permute" else args[1:2]
        dims = list(given[0] if len(given) == 1 and isinstance(given[0], (list, tuple))
                    else given)
        return [int(d) % rank for d in dims]
    first, second = (int(d) % rank for d in args[1:3])
    dims = list(range(rank))
    dims[first], dims[second] = dims[second], dims[first]
    return dims


def _lower_permute(builder: _Builder, node: fx.Node, reference: Tensor,
                   result: Tensor) -> int | None:
    dims = node_permutation(node, reference.dim())
    if dims[0] != 0:
        builder.problems.append(f"{node.name}: a permutation that moves the batch dimension")
        return None
    module = Permute([d - 1 for d in dims[1:]])
    return builder.affine(module, builder.live[node.all_input_nodes[0]], reference, node.name)


def _lower_cat(builder: _Builder, node: fx.Node, values: dict[fx.Node, Any],
               result: Tensor) -> int | None:
    args: tuple[Any, ...] = tuple(node.args)
    parts = args[0]
    dim = int(node.kwargs.get("dim", args[1] if len(args) > 1 else 0)) % result.dim()  # type: ignore[arg-type]
    if not isinstance(parts, (list, tuple)) or dim == 0:
        builder.problems.append(f"{node.name}: torch.cat along the batch dimension")
        return None
    if not all(isinstance(p, fx.Node) and p in builder.live for p in parts):
        builder.problems.append(f"{node.name}: torch.cat of constants and values that depend "
                                "on the input (concatenate values only)")
        return None
    inputs = tuple(builder.live[p] for p in parts)
    return builder.add(Concat(dim=dim - 1, name=node.name), inputs, result)
