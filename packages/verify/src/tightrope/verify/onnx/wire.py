"""The protocol-buffers wire format, as much of it as ONNX files need.

A message is a sequence of fields; each starts with a varint key ``field_number << 3 | wire_type``
followed by its value: a varint (type 0), 8 little-endian bytes (type 1), a varint length and
that many bytes (type 2: strings, bytes, nested messages and packed repeated scalars) or 4
little-endian bytes (type 5). Groups (types 3 and 4) are obsolete and rejected. See
https://protobuf.dev/programming-guides/encoding/.

Decoding never copies payloads: length-delimited values are ``memoryview`` slices of the input.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

__all__ = [
    "FIXED32",
    "FIXED64",
    "LENGTH",
    "VARINT",
    "Field",
    "WireError",
    "encode_fixed32_float",
    "encode_key",
    "encode_length_delimited",
    "encode_varint",
    "fields",
    "packed_varints",
    "signed64",
]

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5

#: One decoded field: ``(number, wire_type, value)``; the value is an ``int`` for varints, and
#: the raw bytes for the other wire types.
Field = tuple[int, int, "int | memoryview"]


class WireError(ValueError):
    """The bytes are not a well-formed protocol-buffers message."""


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    end = len(data)
    while True:
        if pos >= end:
            raise WireError(f"truncated varint at byte {pos}")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError(f"varint longer than 10 bytes at byte {pos}")


def signed64(value: int) -> int:
    """A varint read as a two's-complement int64 (how protobuf stores negative int64/int32)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def fields(data: bytes | memoryview) -> Iterator[Field]:
    """Yield the fields of one message in file order.

    Raises:
        WireError: on truncated data, an unknown wire type or field number 0.
    """
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
    pos = 0
    end = len(view)
    while pos < end:
        key, pos = _varint(view, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {pos}")
        if wire_type == VARINT:
            value, pos = _varint(view, pos)
            yield number, wire_type, value
        elif wire_type == LENGTH:
            length, pos = _varint(view, pos)
            if pos + length > end:
                raise WireError(
                    f"field {number} claims {length} bytes at byte {pos}, only {end - pos} left"
                )
            yield number, wire_type, view[pos : pos + length]
            pos += length
        elif wire_type in (FIXED64, FIXED32):
            size = 8 if wire_type == FIXED64 else 4
            if pos + size > end:
                raise WireError(f"truncated fixed-width field {number} at byte {pos}")
            yield number, wire_type, view[pos : pos + size]
            pos += size
        else:
            raise WireError(f"unsupported wire type {wire_type} (field {number}) at byte {pos}")


def packed_varints(data: memoryview) -> list[int]:
    """The unsigned varints of a packed repeated field."""
    values = []
    pos = 0
    while pos < len(data):
        value, pos = _varint(data, pos)
        values.append(value)
    return values


def encode_varint(value: int) -> bytes:
    """Varint bytes of a non-negative int, or of a negative int64 in two's complement."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def encode_key(number: int, wire_type: int) -> bytes:
    return encode_varint(number << 3 | wire_type)


def encode_length_delimited(number: int, payload: bytes) -> bytes:
    return encode_key(number, LENGTH) + encode_varint(len(payload)) + payload


def encode_fixed32_float(number: int, value: float) -> bytes:
    return encode_key(number, FIXED32) + struct.pack("<f", value)
