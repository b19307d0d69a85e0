"""The ONNX messages a feed-forward network needs, decoded from (and encoded to) wire bytes.

Field numbers follow ``onnx/onnx.proto`` (IR version 3 and later): ModelProto.graph (7) and
opset_import (8); GraphProto node (1), name (2), initializer (5), input (11), output (12);
NodeProto input (1), output (2), name (3), op_type (4), attribute (5), domain (7);
AttributeProto name (1), f (2), i (3), s (4), t (5), floats (7), ints (8), type (20);
TensorProto dims (1), data_type (2), float_data (4), int32_data (5), int64_data (7), name (8),
raw_data (9), double_data (10), data_location (14); ValueInfoProto name (1), type (2);
TypeProto.tensor_type (1) with elem_type (1) and shape (2) of dims with dim_value (1) and
dim_param (2). Unknown fields are skipped, as protobuf readers do.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tightrope.verify.onnx.wire import (
    FIXED32,
    FIXED64,
    LENGTH,
    VARINT,
    WireError,
    encode_fixed32_float,
    encode_key,
    encode_length_delimited,
    encode_varint,
    fields,
    packed_varints,
    signed64,
)

__all__ = [
    "DTYPES",
    "Attribute",
    "Graph",
    "Model",
    "Node",
    "TensorProto",
    "ValueInfo",
    "decode_model",
    "encode_model",
]

#: ONNX TensorProto.DataType codes -> torch dtypes (the numeric ones torch can hold).
DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}


def _text(value: int | memoryview) -> str:
    if not isinstance(value, memoryview):
        raise WireError("expected a string field, got a varint")
    return bytes(value).decode("utf-8", errors="replace")


def _bytes(value: int | memoryview) -> memoryview:
    if not isinstance(value, memoryview):
        raise WireError("expected a length-delimited field, got a varint")
    return value


def _int(value: int | memoryview) -> int:
    if isinstance(value, memoryview):
        raise WireError("expected a varint field, got bytes")
    return signed64(value)


def _repeated_ints(wire_type: int, value: int | memoryview, into: list[int]) -> None:
    if wire_type == LENGTH:
        into.extend(signed64(v) for v in packed_varints(_bytes(value)))
    else:
        into.append(_int(value))


def _repeated_fixed(wire_type: int, value: int | memoryview, fmt: str, into: list[float]) -> None:
    raw = bytes(_bytes(value))
    size = struct.calcsize(fmt)
    if len(raw) % size:
        raise WireError(f"packed field of {len(raw)} bytes is not a multiple of {size}")
    into.extend(v for (v,) in struct.iter_unpack("<" + fmt, raw))
    if wire_type not in (LENGTH, FIXED32, FIXED64):
        raise WireError(f"unexpected wire type {wire_type} for a float field")


@dataclass(frozen=True, slots=True)
class TensorProto:
    """A constant tensor: ``values`` holds the data with shape ``dims`` and its torch dtype."""

    name: str
    dims: tuple[int, ...]
    values: Tensor

    @classmethod
    def decode(cls, data: memoryview) -> TensorProto:
        dims: list[int] = []
        data_type = 0
        name = ""
        raw: bytes | None = None
        floats: list[float] = []
        doubles: list[float] = []
        ints: list[int] = []
        external = False
        for number, wire_type, value in fields(data):
            if number == 1:
                _repeated_ints(wire_type, value, dims)
            elif number == 2:
                data_type = _int(value)
            elif number == 4:
                _repeated_fixed(wire_type, value, "f", floats)
            elif number in (5, 7):  # int32_data / int64_data (int32s are varints too)
                _repeated_ints(wire_type, value, ints)
            elif number == 8:
                name = _text(value)
            elif number == 9:
                raw = bytes(_bytes(value))
            elif number == 10:
                _repeated_fixed(wire_type, value, "d", doubles)
            elif number == 14:
                external = _int(value) == 1
        if external:
            raise WireError(f"tensor {name!r} keeps its data in an external file; "
                            "save the model with all tensors inside the .onnx file")
        if data_type not in DTYPES:
            raise WireError(f"tensor {name!r} has data type {data_type}, which is not numeric "
                            "or not supported")
        dtype = DTYPES[data_type]
        count = 1
        for d in dims:
            if d < 0:
                raise WireError(f"tensor {name!r} has a negative dimension in {dims}")
            count *= d
        if raw is not None:
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) != count * itemsize:
                raise WireError(f"tensor {name!r} of shape {dims} needs {count * itemsize} "
                                f"bytes of raw data, has {len(raw)}")
            flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(
                0, dtype=dtype)
            if sys.byteorder != "little" and itemsize > 1:  # pragma: no cover
                flat = flat.view(torch.uint8).view(-1, itemsize).flip(1).reshape(-1).view(dtype)
        elif dtype in (torch.float32, torch.float16, torch.bfloat16):
            flat = torch.tensor(floats if dtype == torch.float32 else [], dtype=dtype)
            if dtype != torch.float32:  # float16/bfloat16 sit in int32_data as bit patterns
                flat = torch.tensor(ints, dtype=torch.int32).to(torch.int16).view(dtype)
        elif dtype == torch.float64:
            flat = torch.tensor(doubles, dtype=dtype)
        else:
            flat = torch.tensor(ints, dtype=torch.int64).to(dtype)
        if flat.numel() != count:
            raise WireError(f"tensor {name!r} of shape {dims} needs {count} values, "
                            f"has {flat.numel()}")
        return cls(name=name, dims=tuple(dims), values=flat.reshape(dims))

    def encode(self) -> bytes:
        out = b"".join(encode_key(1, VARINT) + encode_varint(d) for d in self.dims)
        if self.values.dtype not in _CODES:
            raise TypeError(f"cannot encode a tensor of dtype {self.values.dtype}")
        out += encode_key(2, VARINT) + encode_varint(_CODES[self.values.dtype])
        out += encode_length_delimited(8, self.name.encode())
        raw = self.values.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        return out + encode_length_delimited(9, bytes(raw.tolist()))


@dataclass(frozen=True, slots=True)
class Attribute:
    """A node attribute; only the fields the importer reads (floats, ints, strings, tensors)."""

    name: str
    f: float | None = None
    i: int | None = None
    s: bytes | None = None
    t: TensorProto | None = None
    floats: tuple[float, ...] = ()
    ints: tuple[int, ...] = ()
    type: int = 0

    @classmethod
    def decode(cls, data: memoryview) -> Attribute:
        name = ""
        f: float | None = None
        i: int | None = None
        s: bytes | None = None
        t: TensorProto | None = None
        floats: list[float] = []
        ints: list[int] = []
        kind = 0
        for number, wire_type, value in fields(data):
            if number == 1:
                name = _text(value)
            elif number == 2:
                f = struct.unpack("<f", bytes(_bytes(value)))[0]
            elif number == 3:
                i = _int(value)
            elif number == 4:
                s = bytes(_bytes(value))
            elif number == 5:
                t = TensorProto.decode(_bytes(value))
            elif number == 7:
                _repeated_fixed(wire_type, value, "f", floats)
            elif number == 8:
                _repeated_ints(wire_type, value, ints)
            elif number == 20:
                kind = _int(value)
        return cls(name, f, i, s, t, tuple(floats), tuple(ints), kind)

    def encode(self) -> bytes:
        out = encode_length_delimited(1, self.name.encode())
        kind = self.type
        if self.f is not None:
            out += encode_fixed32_float(2, self.f)
            kind = kind or 1
        if self.i is not None:
            out += encode_key(3, VARINT) + encode_varint(self.i)
            kind = kind or 2
        if self.s is not None:
            out += encode_length_delimited(4, self.s)
            kind = kind or 3
        if self.t is not None:
            out += encode_length_delimited(5, self.t.encode())
            kind = kind or 4
        if self.floats:
            out += encode_length_delimited(7, struct.pack(f"<{len(self.floats)}f", *self.floats))
            kind = kind or 6
        if self.ints:
            out += encode_length_delimited(8, b"".join(encode_varint(v) for v in self.ints))
            kind = kind or 7
        return out + encode_key(20, VARINT) + encode_varint(kind)


@dataclass(frozen=True, slots=True)
class Node:
    """One graph node: ``outputs = op_type(inputs; attributes)``."""

    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    name: str = ""
    attributes: dict[str, Attribute] = field(default_factory=dict)
    domain: str = ""

    @classmethod
    def decode(cls, data: memoryview) -> Node:
        inputs: list[str] = []
        outputs: list[str] = []
        name = op_type = domain = ""
        attributes: dict[str, Attribute] = {}
        for number, _, value in fields(data):
            if number == 1:
                inputs.append(_text(value))
            elif number == 2:
                outputs.append(_text(value))
            elif number == 3:
                name = _text(value)
            elif number == 4:
                op_type = _text(value)
            elif number == 5:
                attribute = Attribute.decode(_bytes(value))
                attributes[attribute.name] = attribute
            elif number == 7:
                domain = _text(value)
        return cls(op_type, tuple(inputs), tuple(outputs), name, attributes, domain)

    def encode(self) -> bytes:
        out = b"".join(encode_length_delimited(1, s.encode()) for s in self.inputs)
        out += b"".join(encode_length_delimited(2, s.encode()) for s in self.outputs)
        out += encode_length_delimited(3, self.name.encode())
        out += encode_length_delimited(4, self.op_type.encode())
        out += b"".join(encode_length_delimited(5, a.encode()) for a in self.attributes.values())
        return out

    @property
    def label(self) -> str:
        """How error messages name the node: ``Gemm 'fc1'`` (or its first output)."""
        return f"{self.op_type} {self.name or (self.outputs[0] if self.outputs else '?')!r}"


@dataclass(frozen=True, slots=True)
class ValueInfo:
    """A graph input or output: name, element type and shape (``None`` for symbolic dims)."""

    name: str
    elem_type: int = 0
    shape: tuple[int | None, ...] | None = None

    @classmethod
    def decode(cls, data: memoryview) -> ValueInfo:
        name = ""
        elem_type = 0
        shape: tuple[int | None, ...] | None = None
        for number, _, value in fields(data):
            if number == 1:
                name = _text(value)
            elif number == 2:
                for t_number, _, t_value in fields(_bytes(value)):
                    if t_number != 1:  # only tensor types
                        continue
                    for tt_number, _, tt_value in fields(_bytes(t_value)):
                        if tt_number == 1:
                            elem_type = _int(tt_value)
                        elif tt_number == 2:
                            shape = tuple(_dim(_bytes(d)) for _, _, d in fields(_bytes(tt_value)))
        return cls(name, elem_type, shape)

    def encode(self) -> bytes:
        tensor = encode_key(1, VARINT) + encode_varint(self.elem_type)
        if self.shape is not None:
            dims = b"".join(
                encode_length_delimited(
                    1,
                    encode_length_delimited(2, b"N")
                    if d is None
                    else encode_key(1, VARINT) + encode_varint(d),
                )
                for d in self.shape
            )
            tensor += encode_length_delimited(2, dims)
        type_proto = encode_length_delimited(1, tensor)
        return encode_length_delimited(1, self.name.encode()) + encode_length_delimited(
            2, type_proto
        )


def _dim(data: memoryview) -> int | None:
    for number, _, value in fields(data):
        if number == 1:
            return _int(value)
    return None


@dataclass(frozen=True, slots=True)
class Graph:
    """A computation graph: nodes in the file's order, constants, inputs and outputs."""

    nodes: tuple[Node, ...]
    initializers: dict[str, TensorProto]
    inputs: tuple[ValueInfo, ...]
    outputs: tuple[ValueInfo, ...]
    name: str = ""

    @classmethod
    def decode(cls, data: memoryview) -> Graph:
        nodes: list[Node] = []
        initializers: dict[str, TensorProto] = {}
        inputs: list[ValueInfo] = []
        outputs: list[ValueInfo] = []
        name = ""
        for number, _, value in fields(data):
            if number == 1:
                nodes.append(Node.decode(_bytes(value)))
            elif number == 2:
                name = _text(value)
            elif number == 5:
                tensor = TensorProto.decode(_bytes(value))
                initializers[tensor.name] = tensor
            elif number == 11:
                inputs.append(ValueInfo.decode(_bytes(value)))
            elif number == 12:
                outputs.append(ValueInfo.decode(_bytes(value)))
        return cls(tuple(nodes), initializers, tuple(inputs), tuple(outputs), name)

    def encode(self) -> bytes:
        out = b"".join(encode_length_delimited(1, n.encode()) for n in self.nodes)
        out += encode_length_delimited(2, self.name.encode())
        out += b"".join(encode_length_delimited(5, t.encode()) for t in self.initializers.values())
        out += b"".join(encode_length_delimited(11, v.encode()) for v in self.inputs)
        return out + b"".join(encode_length_delimited(12, v.encode()) for v in self.outputs)


@dataclass(frozen=True, slots=True)
class Model:
    """A model file: its graph and the default-domain opset version (0 when not declared)."""

    graph: Graph
    opset: int = 0
    ir_version: int = 0

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Model:
        graph: Graph | None = None
        opset = 0
        ir_version = 0
        for number, _, value in fields(memoryview(data)):
            if number == 1:
                ir_version = _int(value)
            elif number == 7:
                graph = Graph.decode(_bytes(value))
            elif number == 8:
                domain = ""
                version = 0
                for o_number, _, o_value in fields(_bytes(value)):
                    if o_number == 1:
                        domain = _text(o_value)
                    elif o_number == 2:
                        version = _int(o_value)
                if domain in ("", "ai.onnx"):
                    opset = version
        if graph is None:
            raise WireError("no graph (ModelProto field 7) in the file")
        return cls(graph, opset, ir_version)

    def encode(self) -> bytes:
        opset = encode_key(2, VARINT) + encode_varint(self.opset)
        return (
            encode_key(1, VARINT)
            + encode_varint(self.ir_version)
            + encode_length_delimited(2, b"tightrope")
            + encode_length_delimited(7, self.graph.encode())
            + encode_length_delimited(8, opset)
        )


def decode_model(data: bytes | memoryview) -> Model:
    """Decode a serialized ``ModelProto``. Raises :class:`WireError` on malformed bytes."""
    return Model.decode(data)


def encode_model(model: Model) -> bytes:
    """Serialize a :class:`Model` (raw-data tensors, packed repeated fields)."""
    return model.encode()
