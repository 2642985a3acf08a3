"""ONNX teachers without a runtime to plan: the graph read from the file, the layout, the
fingerprint, the refusals, the provider choice; and the small models run by onnxruntime.

The models are built here with onnx's own helpers (the same proto the exporters write), and
read back by ``distill.onnxmodel`` and by onnx's loader, which must agree.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from distill.onnxmodel import OnnxError, read_onnx
from distill.teacher import (
    OnnxTeacher,
    Preprocessing,
    TeacherError,
    fetch_teacher,
    inspect_teacher,
    load_teacher,
    onnx_providers,
    teacher_fingerprint,
)

RNG = np.random.default_rng(0)
WEIGHT = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)


def conv_model(shape=("batch", 3, 8, 8), layout="NCHW", outputs=("embedding",), dtype=TensorProto.FLOAT,
               weights_as_inputs=False) -> onnx.ModelProto:
    """x -> (NHWC: Transpose) -> Conv 3x3 -> GlobalAveragePool -> Flatten -> each output [batch, 4]."""
    nodes, first = [], "x"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]))
        first = "x_nchw"
    nodes += [helper.make_node("Conv", [first, "w"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("GlobalAveragePool", ["c"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"])]
    nodes += [helper.make_node("Identity", ["f"], [name]) for name in outputs]
    w = numpy_helper.from_array(WEIGHT, "w")
    inputs = [helper.make_tensor_value_info("x", dtype, list(shape))]
    if weights_as_inputs:  # IR 3 listed every weight as a graph input too
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, list(WEIGHT.shape)))
    graph = helper.make_graph(nodes, "tiny", inputs,
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in outputs],
                              initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="distill-tests")


def save(model, path, **kw) -> str:
    onnx.save_model(model, str(path), **kw)
    return str(path)


def test_the_graph_is_read_as_onnx_reads_it(tmp_path):
    path = save(conv_model(weights_as_inputs=True), tmp_path / "m.onnx")
    graph = read_onnx(path)
    assert list(graph.inputs) == ["x"]  # the weight listed as an input is not something to feed
    assert (graph.inputs["x"].dtype, graph.inputs["x"].shape) == ("float32", (None, 3, 8, 8))
    assert (graph.outputs["embedding"].dtype, graph.outputs["embedding"].shape) == ("float32", (None, 4))
    assert (graph.opset, graph.producer, graph.external) == (17, "distill-tests", ())
    ref = onnx.load(path)
    dims = [[d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
            for i in ref.graph.input if i.name == "x"]
    assert dims == [list(graph.inputs["x"].shape)]


def test_layouts_and_sizes_come_from_the_file(tmp_path):
    nchw = inspect_teacher(save(conv_model(), tmp_path / "a.onnx"))
    nhwc = inspect_teacher(save(conv_model(("n", 8, 8, 3), "NHWC"), tmp_path / "b.onnx"))
    assert (nchw.format, nchw.layout, nchw.height, nchw.width, nchw.embedding_dim) == ("onnx", "NCHW", 8, 8, 4)
    assert (nhwc.format, nhwc.layout, nhwc.height, nhwc.width, nhwc.input_name) == ("onnx", "NHWC", 8, 8, "x")
    wide = inspect_teacher(save(conv_model(("n", 3, 8, 12)), tmp_path / "c.onnx"))
    assert (wide.height, wide.width) == (8, 12)


def test_both_layouts_give_the_same_embeddings_on_onnxruntime(tmp_path):
    pixels = RNG.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    pre = Preprocessing()
    a = load_teacher(inspect_teacher(save(conv_model(), tmp_path / "a.onnx")), pre, threads=1)
    b = load_teacher(inspect_teacher(save(conv_model(("n", 8, 8, 3), "NHWC"), tmp_path / "b.onnx")), pre, threads=1)
    assert isinstance(a, OnnxTeacher) and "CPUExecutionProvider" in a.runs_on and "NCHW" in a.runs_on
    got_a, got_b = a(pixels), b(pixels)
    assert got_a.shape == (5, 4) and got_a.dtype == np.float32
    np.testing.assert_allclose(got_a, got_b, rtol=0, atol=1e-5)
    assert np.array_equal(a(pixels), got_a)  # same batch, same floats
    # The conv's mean over the image, computed directly: the model computes what it says.
    padded = np.pad(pre.apply(pixels), ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = sum(padded[:, i:i + 8, j:j + 8] @ WEIGHT[:, :, i, j].T for i in range(3) for j in range(3))
    np.testing.assert_allclose(got_a, conv.mean(axis=(1, 2)), rtol=1e-4, atol=1e-4)


def test_the_fingerprint_is_the_files_sha256_and_covers_external_weights(tmp_path):
    path = save(conv_model(), tmp_path / "m.onnx")
    with open(path, "rb") as f:
        assert teacher_fingerprint(path) == hashlib.sha256(f.read()).hexdigest()  # what sha256sum prints
    ext = tmp_path / "ext"
    ext.mkdir()
    big = save(conv_model(), ext / "m.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert read_onnx(big).external == ("weights.bin",)
    before = teacher_fingerprint(big)
    assert inspect_teacher(big).embedding_dim == 4
    (ext / "weights.bin").write_bytes((ext / "weights.bin").read_bytes()[::-1])
    assert teacher_fingerprint(big) != before
    (ext / "weights.bin").unlink()
    with pytest.raises(TeacherError, match="weights.bin, which is not beside it"):
        teacher_fingerprint(big)
    assert fetch_teacher(big) == big  # a local path is used where it is


@pytest.mark.parametrize("model, match", [
    (conv_model(("n", 10), "NCHW"), r"shape \[None, 10\]; expected \[N, H, W, 3\] or \[N, 3, H, W\] images"),
    (conv_model((1, 3, 112, 112)), r"fixed batch size 1 .*dynamic_axes"),
    (conv_model(("n", 1, 112, 112)), "no axis of 3 channels"),
    (conv_model(("n", 3, "h", "w")), "no fixed height/width .*None, 3, 112, 112"),
    (conv_model(dtype=TensorProto.FLOAT16), "is float16; distill feeds float32"),
    (conv_model(outputs=("a", "b")), r"outputs \['a', 'b'\]; pass --teacher-output NAME"),
])
def test_models_that_cannot_be_fed_are_refused_in_one_line(tmp_path, model, match):
    with pytest.raises(TeacherError, match=match) as e:
        inspect_teacher(save(model, tmp_path / "m.onnx"))
    assert "\n" not in str(e.value)


def test_several_outputs_are_handled_by_name(tmp_path):
    path = save(conv_model(outputs=("logits", "embedding")), tmp_path / "m.onnx")
    assert inspect_teacher(path).output_name == "embedding"  # the one named *embed*
    assert inspect_teacher(path, output="logits").output_name == "logits"
    with pytest.raises(TeacherError, match="no output 'nope'"):
        inspect_teacher(path, output="nope")
    with pytest.raises(TeacherError, match="--signature other names a SavedModel signature"):
        inspect_teacher(path, signature="other")


def test_files_that_are_not_onnx_are_refused(tmp_path):
    for name, data in [("empty.onnx", b""), ("text.onnx", b"hello, not a model\n"), ("junk.onnx", b"\xff" * 64)]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TeacherError, match="ONNX model"):
            inspect_teacher(str(tmp_path / name))
    with pytest.raises(OnnxError, match="cannot read it"):
        read_onnx(str(tmp_path / "missing.onnx"))
    with pytest.raises(TeacherError, match="neither a TensorFlow SavedModel .* nor an ONNX file"):
        inspect_teacher(str(tmp_path))


def test_the_execution_provider_follows_the_actors_gpus():
    cpu, both = ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers(0.0, cpu, "m.onnx") == cpu
    assert onnx_providers(0.0, both, "m.onnx") == cpu  # a CPU actor never takes a GPU it was not given
    assert onnx_providers(1.0, both, "m.onnx") == both
    assert onnx_providers(None, both, "m.onnx") == both and onnx_providers(None, cpu, "m.onnx") == cpu
    with pytest.raises(TeacherError, match="pip install onnxruntime-gpu"):
        onnx_providers(0.5, cpu, "m.onnx")


def test_a_missing_onnxruntime_is_refused_naming_the_extra(tmp_path, monkeypatch):
    import importlib.util

    path = save(conv_model(), tmp_path / "m.onnx")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(TeacherError, match=r"onnxruntime, which is not installed: pip install 'distill\[onnx\]'"):
        inspect_teacher(path)
