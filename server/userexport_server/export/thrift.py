"""Thrift's compact protocol, the encoding of a Parquet footer, decoded into plain values and encoded
back to the same bytes: parquet.py joins the parts of an export by rewriting their footers' offsets,
and pyarrow has no API that edits a footer. A struct is a dict of field id to (type, value) in the
order read, so fields this module knows nothing of survive the round trip unchanged.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

# Compact type ids. A struct field's boolean is its type (TRUE or FALSE), with no payload; decoded,
# any boolean is of type TRUE, its value True or False.
STOP, TRUE, FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(13)

Struct = dict[int, tuple[int, Any]]


@dataclass(slots=True)
class List:
    """A list (or set) value: its elements' type and the elements."""

    kind: int
    items: list[Any]


def decode(data: bytes) -> Struct:
    """The struct encoded in `data` (all of it); ValueError when it is no compact struct."""
    reader = _Reader(data)
    try:
        found = reader.struct()
    except IndexError:
        raise ValueError("truncated thrift struct") from None
    if reader.pos != len(data):
        raise ValueError(f"{len(data) - reader.pos} bytes after the thrift struct")
    return found


def encode(value: Struct) -> bytes:
    out = bytearray()
    _write_struct(out, value)
    return bytes(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self) -> int:
        result = shift = 0
        while True:
            byte = self.byte()
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    def zigzag(self) -> int:
        raw = self.varint()
        return (raw >> 1) ^ -(raw & 1)

    def struct(self) -> Struct:
        fields: Struct = {}
        last = 0
        while (header := self.byte()) != STOP:
            kind, delta = header & 0x0F, header >> 4
            last = last + delta if delta else self.zigzag()
            fields[last] = (TRUE, kind == TRUE) if kind in (TRUE, FALSE) else (kind, self.value(kind))
        return fields

    def value(self, kind: int) -> Any:
        if kind in (TRUE, FALSE):  # a list's boolean: one byte
            return self.byte() == TRUE
        if kind == BYTE:
            return struct.unpack("b", bytes([self.byte()]))[0]
        if kind in (I16, I32, I64):
            return self.zigzag()
        if kind == DOUBLE:
            self.pos += 8
            return struct.unpack("<d", self.data[self.pos - 8:self.pos])[0]
        if kind == BINARY:
            size = self.varint()
            self.pos += size
            if self.pos > len(self.data):
                raise IndexError
            return bytes(self.data[self.pos - size:self.pos])
        if kind in (LIST, SET):
            header = self.byte()
            size = header >> 4 if header >> 4 != 15 else self.varint()
            return List(header & 0x0F, [self.value(header & 0x0F) for _ in range(size)])
        if kind == STRUCT:
            return self.struct()
        raise ValueError(f"thrift type {kind} is not read here")  # maps: a Parquet footer has none


def _varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _zigzag(out: bytearray, value: int) -> None:
    _varint(out, (value << 1) ^ (value >> 63))


def _write_struct(out: bytearray, fields: Struct) -> None:
    last = 0
    for field_id, (stored, value) in fields.items():
        kind = (TRUE if value else FALSE) if stored in (TRUE, FALSE) else stored
        if 0 < field_id - last <= 15:
            out.append((field_id - last) << 4 | kind)
        else:
            out.append(kind)
            _zigzag(out, field_id)
        last = field_id
        if kind not in (TRUE, FALSE):
            _write_value(out, kind, value)
    out.append(STOP)


def _write_value(out: bytearray, kind: int, value: Any) -> None:
    if kind in (TRUE, FALSE):
        out.append(TRUE if value else FALSE)
    elif kind == BYTE:
        out += struct.pack("b", value)
    elif kind in (I16, I32, I64):
        _zigzag(out, value)
    elif kind == DOUBLE:
        out += struct.pack("<d", value)
    elif kind == BINARY:
        _varint(out, len(value))
        out += value
    elif kind in (LIST, SET):
        size = len(value.items)
        if size < 15:
            out.append(size << 4 | value.kind)
        else:
            out.append(0xF0 | value.kind)
            _varint(out, size)
        for item in value.items:
            _write_value(out, value.kind, item)
    elif kind == STRUCT:
        _write_struct(out, value)
    else:
        raise ValueError(f"thrift type {kind} is not written here")
