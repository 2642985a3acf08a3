"""An ONNX model's graph inputs and outputs, read from the file without onnx or onnxruntime.

The embed driver fixes a run's identity from the teacher's inputs and outputs before any actor
loads it, and never imports a runtime to plan (``distill.savedmodel`` does the same for
SavedModels). The fields read (onnx/onnx.proto3, https://github.com/onnx/onnx):

- ``ModelProto``: 1 = ir_version, 2 = producer_name, 7 = graph, 8 = repeated opset_import
  (``OperatorSetIdProto``: 1 = domain, 2 = version)
- ``GraphProto``: 5 = repeated initializer (``TensorProto``), 11 = repeated input,
  12 = repeated output (``ValueInfoProto``)
- ``ValueInfoProto``: 1 = name, 2 = type; ``TypeProto``: 1 = tensor_type
  (``TypeProto.Tensor``: 1 = elem_type, 2 = ``TensorShapeProto``: 1 = repeated dim,
  ``Dimension``: 1 = dim_value, 2 = dim_param)
- ``TensorProto``: 8 = name, 13 = repeated external_data (key 1, value 2), 14 = data_location

A graph input that is also an initializer is a weight with a default (IR < 4 lists weights as
inputs), not something to feed. Weights stored outside the file (``external_data``, models
over 2 GB) are named so the teacher's fingerprint covers them. The test compares the result
with what onnx's own loader and onnxruntime report.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

from distill.errors import BadInput
from distill.protowire import fields, signed, text
from distill.savedmodel import TensorSig

# onnx.proto3 TensorProto.DataType: the element types an input or output may name.
DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string",
          9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}


class OnnxError(BadInput):
    """The file is not a readable ONNX model; the message names it."""


@dataclass(frozen=True)
class OnnxGraph:
    inputs: dict[str, TensorSig]  # in the graph's order; weights with defaults left out
    outputs: dict[str, TensorSig]
    opset: int | None  # of the default ("" / ai.onnx) domain
    producer: str
    external: tuple[str, ...]  # files holding weights outside the model file, relative to it


def _shape(buf: memoryview) -> tuple[int | None, ...]:
    dims: list[int | None] = []
    for field, _, dim in fields(buf):
        if field == 1:
            value = next((signed(v) for f, w, v in fields(dim) if f == 1 and w == 0), None)
            dims.append(value if value is not None and value >= 0 else None)  # dim_param / unknown: free
    return tuple(dims)


def _value_info(buf: memoryview) -> tuple[str, TensorSig]:
    name, dtype, shape = "", "not a tensor", None
    for field, _, value in fields(buf):
        if field == 1:
            name = text(value)
        elif field == 2:
            for f, _, tensor in fields(value):
                if f != 1:
                    continue
                dtype = "undefined"
                for g, w, v in fields(tensor):
                    if g == 1 and w == 0:
                        dtype = DTYPES.get(v, f"type {v}")
                    elif g == 2:
                        shape = _shape(v)
    return name, TensorSig(dtype, shape)


def _initializer(buf: memoryview) -> tuple[str, str | None]:
    """(name, external file or None)."""
    name, location, external = "", None, False
    for field, wire, value in fields(buf):
        if field == 8:
            name = text(value)
        elif field == 14 and wire == 0:
            external = value == 1  # DataLocation.EXTERNAL
        elif field == 13:
            entry = {f: text(v) for f, _, v in fields(value) if f in (1, 2)}
            if entry.get(1) == "location":
                location = entry.get(2)
    return name, location if external else None


def _graph(buf: memoryview) -> tuple[dict, dict, set[str], set[str]]:
    inputs, outputs, weights, external = {}, {}, set(), set()
    for field, _, value in fields(buf):
        if field == 5:
            name, location = _initializer(value)
            weights.add(name)
            if location:
                external.add(location)
        elif field in (11, 12):
            name, sig = _value_info(value)
            (inputs if field == 11 else outputs)[name] = sig
    return inputs, outputs, weights, external


def read_onnx(path: str) -> OnnxGraph:
    """The inputs and outputs of the ONNX model file ``path`` (mapped, not read whole)."""
    try:
        with open(path, "rb") as f:
            data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)) if os.path.getsize(path) else memoryview(b"")
    except OSError as e:
        raise OnnxError(f"{path}: cannot read it ({e.strerror or e})") from None
    graph, opset, producer, ir = None, None, "", None
    try:
        for field, wire, value in fields(data):
            if field == 1 and wire == 0:
                ir = value
            elif field == 2 and wire == 2:
                producer = text(value)
            elif field == 7 and wire == 2:
                graph = _graph(value)
            elif field == 8 and wire == 2:
                entry = {f: v for f, _, v in fields(value)}
                if not bytes(entry.get(1, b"")) or bytes(entry.get(1, b"")) == b"ai.onnx":
                    opset = entry.get(2)
    except (ValueError, UnicodeDecodeError) as e:
        raise OnnxError(f"{path} is not a readable ONNX model ({e}); pass an .onnx file (e.g. from torch.onnx.export "
                        "or tf2onnx)") from None
    if graph is None or ir is None:
        raise OnnxError(f"{path} is not an ONNX model (no graph); pass an .onnx file (e.g. from torch.onnx.export or "
                        "tf2onnx)")
    inputs, outputs, weights, external = graph
    return OnnxGraph({k: v for k, v in inputs.items() if k not in weights}, outputs, opset, producer,
                     tuple(sorted(external)))
