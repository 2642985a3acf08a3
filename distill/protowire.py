"""Protocol-buffer wire format, read without protobuf: what ``distill.savedmodel`` and
``distill.onnxmodel`` use to read the few fields a model file states about its inputs and
outputs (https://protobuf.dev/programming-guides/encoding/). Everything else is skipped by
its length, so a large model is walked, not decoded."""

from __future__ import annotations

from typing import Iterator


def varint(buf: memoryview, i: int) -> tuple[int, int]:
    """(value, next position) of the varint at ``i``."""
    shift = value = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 64 bits")


def fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value): an int for varints, a memoryview for the rest."""
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(buf, i)
        elif wire == 2:
            n, i = varint(buf, i)
            if i + n > len(buf):
                raise ValueError(f"field {field} runs past its message")
            value, i = buf[i:i + n], i + n
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:  # 3/4: proto2 groups, used by none of the messages read here
            raise ValueError(f"unexpected wire type {wire}")
        yield field, wire, value


def signed(v: int) -> int:
    """An int64 field's value (negative numbers are sent as 64-bit two's complement)."""
    return v - (1 << 64) if v >= 1 << 63 else v


def text(v: memoryview) -> str:
    return bytes(v).decode()
