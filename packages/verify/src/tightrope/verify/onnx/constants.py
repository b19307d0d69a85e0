"""Constant folding for the ONNX converter: attribute and tensor access on the ``onnx``
package's protobuf messages, and the operators that appear on constants (shape computations,
weight transposes, arithmetic between initializers).

Each function evaluates an operator by its definition on https://onnx.ai/onnx/operators/ for
the cases a feed-forward network needs; anything else raises :class:`UnsupportedError`, which
the converter collects.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from onnx import AttributeProto, NodeProto, TensorProto, numpy_helper
from torch import Tensor

__all__ = [
    "DTYPES",
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
    "label",
    "reshape_target",
    "tensor_values",
]

Shape = tuple[int, ...]


#: ONNX ``TensorProto.DataType`` codes -> torch dtypes (the numeric ones torch can hold).
DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT8: torch.int8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.BOOL: torch.bool,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.BFLOAT16: torch.bfloat16,
}


class UnsupportedError(Exception):
    """One node cannot be converted; the message says why."""


def label(node: NodeProto) -> str:
    """How error messages name a node: ``Gemm 'fc1'`` (or its first output)."""
    return f"{node.op_type} {node.name or (node.output[0] if node.output else '?')!r}"


def tensor_values(tensor: TensorProto) -> Tensor:
    """The values of an initializer or ``Constant`` tensor, with its shape and torch dtype.

    Raises:
        UnsupportedError: a non-numeric data type, or data that does not fit the shape.
    """
    code = tensor.data_type
    if code not in DTYPES:
        name = TensorProto.DataType.Name(code) if code in TensorProto.DataType.values() else code
        raise UnsupportedError(f"tensor {tensor.name!r} has data type {name}, which is not "
                               "numeric or not supported")
    try:
        array = numpy_helper.to_array(tensor)
    except (ValueError, TypeError) as error:  # e.g. raw data of the wrong size
        raise UnsupportedError(f"tensor {tensor.name!r} of shape {list(tensor.dims)} cannot be "
                               f"read: {error}") from error
    if DTYPES[code] is torch.bfloat16:  # numpy has no bfloat16 (onnx gives ml_dtypes')
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def _attribute(node: NodeProto, name: str) -> AttributeProto | None:
    return next((a for a in node.attribute if a.name == name), None)


def attr_int(node: NodeProto, name: str, default: int) -> int:
    attribute = _attribute(node, name)
    return default if attribute is None or not attribute.HasField("i") else int(attribute.i)


def attr_float(node: NodeProto, name: str, default: float) -> float:
    attribute = _attribute(node, name)
    return default if attribute is None or not attribute.HasField("f") else float(attribute.f)


def attr_ints(node: NodeProto, name: str) -> tuple[int, ...] | None:
    attribute = _attribute(node, name)
    return None if attribute is None else tuple(int(v) for v in attribute.ints)


def attr_str(node: NodeProto, name: str, default: str) -> str:
    attribute = _attribute(node, name)
    if attribute is None or not attribute.HasField("s"):
        return default
    return bytes(attribute.s).decode()


def constant_of(attribute: AttributeProto) -> Tensor:
    if attribute.HasField("t"):
        return tensor_values(attribute.t)
    if attribute.name == "value_float" and attribute.HasField("f"):
        return torch.tensor(attribute.f, dtype=torch.float32)
    if attribute.name == "value_int" and attribute.HasField("i"):
        return torch.tensor(attribute.i, dtype=torch.int64)
    if attribute.name == "value_floats":
        return torch.tensor(list(attribute.floats), dtype=torch.float32)
    if attribute.name == "value_ints":
        return torch.tensor(list(attribute.ints), dtype=torch.int64)
    raise UnsupportedError(f"Constant with attribute {attribute.name!r} is not supported")


def axis_list(node: NodeProto, constants: dict[str, Tensor], rank: int) -> list[int]:
    """The ``axes`` of Squeeze/Unsqueeze (attribute before opset 13, input after), in
    ``[0, rank)``."""
    axes = attr_ints(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = tuple(int(a) for a in constants[node.input[1]].reshape(-1).tolist())
    return [a + rank if a < 0 else a for a in (axes or ())]


def axes_count(node: NodeProto, constants: dict[str, Tensor]) -> int:
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


def fold_constant(node: NodeProto, args: list[Tensor], opset: int) -> Tensor:
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
        constants = {node.input[1]: args[1]} if len(args) > 1 else {}
        for axis in sorted(axis_list(node, constants, out.dim() + axes_count(node, constants))):
            out = out.unsqueeze(axis)
        return out
    if op == "Squeeze":
        constants = {node.input[1]: args[1]} if len(args) > 1 else {}
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
