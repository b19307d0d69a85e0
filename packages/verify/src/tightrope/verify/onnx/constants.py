"""Constant folding for the ONNX converter: attribute access and the operators that appear on
constants (shape computations, weight transposes, arithmetic between initializers).

Each function evaluates an operator by its definition on https://onnx.ai/onnx/operators/ for
the cases a feed-forward network needs; anything else raises :class:`UnsupportedError`, which
the converter collects.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from tightrope.verify.onnx.proto import DTYPES, Attribute, Node

__all__ = [
    "Shape",
    "UnsupportedError",
    "attr_float",
    "attr_int",
    "attr_ints",
    "attr_str",
    "axes_count",
    "axis_list",
    "constant_of",
    "fold_constant",
    "reshape_target",
]

Shape = tuple[int, ...]


class UnsupportedError(Exception):
    """One node cannot be converted; the message says why."""


def attr_int(node: Node, name: str, default: int) -> int:
    attribute = node.attributes.get(name)
    return default if attribute is None or attribute.i is None else attribute.i


def attr_float(node: Node, name: str, default: float) -> float:
    attribute = node.attributes.get(name)
    return default if attribute is None or attribute.f is None else attribute.f


def attr_ints(node: Node, name: str) -> tuple[int, ...] | None:
    attribute = node.attributes.get(name)
    return None if attribute is None else attribute.ints


def attr_str(node: Node, name: str, default: str) -> str:
    attribute = node.attributes.get(name)
    return default if attribute is None or attribute.s is None else attribute.s.decode()


def constant_of(attribute: Attribute) -> Tensor:
    if attribute.t is not None:
        return attribute.t.values
    if attribute.name == "value_float" and attribute.f is not None:
        return torch.tensor(attribute.f, dtype=torch.float32)
    if attribute.name == "value_int" and attribute.i is not None:
        return torch.tensor(attribute.i, dtype=torch.int64)
    if attribute.name == "value_floats":
        return torch.tensor(attribute.floats, dtype=torch.float32)
    if attribute.name == "value_ints":
        return torch.tensor(attribute.ints, dtype=torch.int64)
    raise UnsupportedError(f"Constant with attribute {attribute.name!r} is not supported")


def axis_list(node: Node, constants: dict[str, Tensor], rank: int) -> list[int]:
    """The ``axes`` of Squeeze/Unsqueeze (attribute before opset 13, input after), in
    ``[0, rank)``."""
    axes = attr_ints(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1]:
        axes = tuple(int(a) for a in constants[node.inputs[1]].reshape(-1).tolist())
    return [a + rank if a < 0 else a for a in (axes or ())]


def axes_count(node: Node, constants: dict[str, Tensor]) -> int:
    return len(axis_list(node, constants, 0))


def reshape_target(shape: Shape, target: list[int], allow_zero: bool) -> Shape:
    out = [shape[i] if (t == 0 and not allow_zero) else t for i, t in enumerate(target)]
    known = math.prod(d for d in out if d != -1)
    if out.count(-1) > 1:
        raise UnsupportedError(f"Reshape target {target} has more than one -1")
    if -1 in out:
        if known == 0 or math.prod(shape) % known:
            raise UnsupportedError(f"cannot reshape {shape} to {target}")
        out[out.index(-1)] = math.prod(shape) // known
    if math.prod(out) != math.prod(shape):
        raise UnsupportedError(f"cannot reshape {shape} ({math.prod(shape)} values) to {target}")
    return tuple(out)


def fold_constant(node: Node, args: list[Tensor], opset: int) -> Tensor:
    """Evaluate ``node`` on constant inputs (the ops that appear in shape computations)."""
    op = node.op_type
    binary: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "MatMul": torch.matmul,
    }
    if op in binary:
        return binary[op](args[0], args[1])
    if op == "Div":
        if args[0].is_floating_point() or args[1].is_floating_point():
            return args[0] / args[1]
        return torch.div(args[0], args[1], rounding_mode="trunc")
    if op == "Neg":
        return -args[0]
    if op in ("Identity", "Dropout"):
        return args[0]
    if op == "Cast":
        code = attr_int(node, "to", 1)
        if code not in DTYPES:
            raise UnsupportedError(f"Cast to data type {code}")
        return args[0].to(DTYPES[code])
    if op == "Reshape":
        target = [int(v) for v in args[1].tolist()]
        shape = reshape_target(tuple(args[0].shape), target, bool(attr_int(node, "allowzero", 0)))
        return args[0].reshape(shape)
    if op == "Flatten":
        axis = attr_int(node, "axis", 1) % max(args[0].dim(), 1)
        return args[0].reshape(math.prod(args[0].shape[:axis]), -1)
    if op == "Transpose":
        perm = attr_ints(node, "perm") or tuple(reversed(range(args[0].dim())))
        return args[0].permute(*perm)
    if op == "Unsqueeze":
        out = args[0]
        constants = {node.inputs[1]: args[1]} if len(args) > 1 else {}
        for axis in sorted(axis_list(node, constants, out.dim() + axes_count(node, constants))):
            out = out.unsqueeze(axis)
        return out
    if op == "Squeeze":
        constants = {node.inputs[1]: args[1]} if len(args) > 1 else {}
        axes = axis_list(node, constants, args[0].dim())
        keep = [d for i, d in enumerate(args[0].shape) if (axes and i not in axes)
                or (not axes and d != 1)]
        return args[0].reshape(keep)
    if op == "Concat":
        return torch.cat(args, dim=attr_int(node, "axis", 0))
    if op == "Gather":
        axis = attr_int(node, "axis", 0)
        index = args[1].long()
        index = torch.where(index < 0, index + args[0].shape[axis], index)
        return torch.index_select(args[0], axis, index.reshape(-1)).reshape(
            (*args[0].shape[:axis], *index.shape, *args[0].shape[axis + 1 :])
        )
    if op == "Relu":
        return torch.relu(args[0])
    raise UnsupportedError(f"{op} on constants is not supported")
