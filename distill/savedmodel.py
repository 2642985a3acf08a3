"""A SavedModel's signatures, read from ``saved_model.pb`` without TensorFlow.

The embed driver needs only the teacher's signature (input name, shape and dtype; output
names and shapes) to fix the run's identity and check the options; the actors load the model.
Importing TensorFlow and loading the variables for that cost the driver several seconds
(8 s of CPU for ``import tensorflow`` on the 2-core machine of docs/BENCHMARKS.md) before
any work could start. So this module reads the few protobuf fields it needs straight from the
wire format (https://protobuf.dev/programming-guides/encoding/):

- ``SavedModel``: 2 = repeated ``MetaGraphDef``
- ``MetaGraphDef``: 1 = ``MetaInfoDef`` (4 = repeated tags), 5 = map<string, ``SignatureDef``>
- ``SignatureDef``: 1 = inputs, 2 = outputs: map<string, ``TensorInfo``>
- ``TensorInfo``: 1 = name, 2 = dtype (``DataType`` enum), 3 = ``TensorShapeProto``
- ``TensorShapeProto``: 2 = repeated ``Dim`` (1 = size, -1 unknown), 3 = unknown_rank

Everything else (the graph, the object graph, assets) is skipped by its length. The test
compares the result with what TensorFlow's own loader reports, on real models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from distill.errors import BadInput
from distill.protowire import fields as _fields
from distill.protowire import signed as _signed

# tensorflow/core/framework/types.proto: the DataType values a signature may name.
DTYPES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string", 9: "int64",
          10: "bool", 14: "bfloat16", 17: "uint16", 19: "float16", 22: "uint32", 23: "uint64"}


# The initialiser TensorFlow stores as a signature and its loader leaves out of ``signatures``.
INIT_OP = "__saved_model_init_op"


class SavedModelError(BadInput):
    """``saved_model.pb`` cannot be read; the message names the file."""


@dataclass(frozen=True)
class TensorSig:
    """One signature input or output: its shape (None: unknown rank; None dims: free) and dtype."""

    dtype: str
    shape: tuple[int | None, ...] | None


@dataclass(frozen=True)
class Signature:
    inputs: dict[str, TensorSig]
    outputs: dict[str, TensorSig]


def _shape(buf: memoryview) -> tuple[int | None, ...] | None:
    dims: list[int | None] = []
    for field, _, value in _fields(buf):
        if field == 3 and value:
            return None
        if field == 2:
            size = next((_signed(v) for f, w, v in _fields(value) if f == 1 and w == 0), 0)
            dims.append(None if size < 0 else size)
    return tuple(dims)


def _tensor(buf: memoryview) -> TensorSig:
    dtype, shape = 0, None
    for field, wire, value in _fields(buf):
        if field == 2 and wire == 0:
            dtype = value
        elif field == 3 and wire == 2:
            shape = _shape(value)
    return TensorSig(DTYPES.get(dtype, f"dtype {dtype}"), shape)


def _map_entry(buf: memoryview) -> tuple[str, memoryview]:
    key, value = "", memoryview(b"")
    for field, _, v in _fields(buf):
        if field == 1:
            key = bytes(v).decode()
        elif field == 2:
            value = v
    return key, value


def _signature(buf: memoryview) -> Signature:
    inputs, outputs = {}, {}
    for field, _, value in _fields(buf):
        if field in (1, 2):
            name, tensor = _map_entry(value)
            (inputs if field == 1 else outputs)[name] = _tensor(tensor)
    return Signature(inputs, outputs)


def _meta_graph(buf: memoryview) -> tuple[list[str], dict[str, Signature]]:
    tags, sigs = [], {}
    for field, _, value in _fields(buf):
        if field == 1:
            tags += [bytes(v).decode() for f, _, v in _fields(value) if f == 4]
        elif field == 5:
            name, sig = _map_entry(value)
            if name != INIT_OP:
                sigs[name] = _signature(sig)
    return tags, sigs


def read_signatures(path: str, tag: str = "serve") -> dict[str, Signature]:
    """The signatures of the SavedModel in ``path`` (its ``tag`` meta graph, else its only one)."""
    pb = os.path.join(path, "saved_model.pb")
    with open(pb, "rb") as f:
        data = memoryview(f.read())
    try:
        graphs = [_meta_graph(v) for field, wire, v in _fields(data) if field == 2 and wire == 2]
    except (ValueError, UnicodeDecodeError) as e:
        raise SavedModelError(f"{pb} is not a readable SavedModel ({e}); re-export the teacher") from None
    if not graphs:
        raise SavedModelError(f"{pb} holds no meta graph; re-export the teacher with tf.saved_model.save")
    for tags, sigs in graphs:
        if tag in tags:
            return sigs
    return graphs[0][1]
