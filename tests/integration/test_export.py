"""`distill export`: the SavedModel reloads with plain TensorFlow, takes uint8 images, returns
L2-normalised embeddings that match the trained model; the TFLite files run."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def exported(embedded_run, tmp_path_factory):
    from distill.evaluate.export import ExportConfig, run_export
    from distill.train.run import TrainConfig, run_train

    root = tmp_path_factory.mktemp("export")
    train = run_train(TrainConfig(shards=str(embedded_run), out=str(root / "student"), batch_size=8, student="mobilenetv2", width=0.35,
                                  max_steps=40, ema=0.9, progress=False))  # enough steps for BN statistics to settle
    report = run_export(ExportConfig(student=str(root / "student"), out=str(root / "export"), tflite=True,
                                     check_rows=16))
    return embedded_run, train, report


def test_saved_model_serves_normalised_embeddings_that_match_the_trained_model(exported):
    import tensorflow as tf

    from distill.evaluate.export import check_images
    from distill.metrics import l2_normalise
    from distill.train.checkpoints import assign_model, average_key, load_student, read_checkpoint
    from distill.train.student import StudentSpec, build_student, embedding_model

    shards, train, report = exported
    assert report.max_abs_diff <= 1e-4 and report.step == 40 and report.checkpoint == train.checkpoint
    loaded = tf.saved_model.load(report.saved_model)
    fn = loaded.signatures["serving_default"]
    (spec,) = fn.structured_input_signature[1].values()
    assert list(fn.structured_input_signature[1]) == ["images"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 112, 112, 3]
    images = check_images(str(shards), 24, (112, 112))[8:]  # also rows the export's own check did not see
    got = fn(images=tf.constant(images))["embeddings"].numpy()
    assert got.shape == (16, 32) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.ptp(got, axis=0).max() > 1e-3  # different faces, different embeddings
    config, _ = read_checkpoint(train.checkpoint)
    model = build_student(StudentSpec.from_json(config["student"]))
    load_student(model, train.checkpoint)
    want = l2_normalise(embedding_model(model)(images, training=False).numpy())
    np.testing.assert_allclose(got, want, atol=1e-4)
    # Trained with --ema: what is exported is the weights' moving average, not the last weights.
    with np.load(f"{train.checkpoint}/state.npz") as z:
        state = {k: z[k] for k in z.files}
    assert all(average_key(v.path) in state for v in model.trainable_variables)
    assign_model(model, state)
    last = l2_normalise(embedding_model(model)(images, training=False).numpy())
    assert np.abs(got - last).max() > 1e-3


def test_tflite_files_run_and_agree(exported):
    from distill.evaluate.export import check_images, cosine_agreement, run_tflite

    shards, _, report = exported
    assert set(report.tflite) == {"float16", "int8"}
    images = check_images(str(shards), 4, (112, 112))
    ref = run_tflite(report.tflite["float16"], images)
    assert ref.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, atol=1e-3)
    assert cosine_agreement(run_tflite(report.tflite["int8"], images), ref)["min"] > 0.98
    with open(f"{report.out}/export.json") as f:
        doc = json.load(f)
    assert doc["report"]["embedding_dim"] == 32 and doc["report"]["input_size"] == [112, 112]
    assert doc["signature"]["input"]["name"] == "images" and doc["report"]["max_abs_diff"] <= 1e-4
    assert all(c["min"] >= 0.99 for c in doc["report"]["tflite_cosine"].values())


def test_a_mobilefacenet_student_exports_onnx_and_full_integer_tflite(embedded_run, tmp_path):
    """The default student (MobileFaceNet at 64 px), through the CLI: student.onnx (dynamic
    batch, run by onnxruntime) and an integer-only int8 TFLite file (int8 activations, the
    uint8 input and float32 embeddings kept), checked on images its calibration never saw."""
    import subprocess
    import sys

    from distill.evaluate.export import check_images, cosine_agreement, run_tflite
    from distill.train.run import TrainConfig, run_train

    run_train(TrainConfig(shards=str(embedded_run), out=str(tmp_path / "student"), batch_size=8, max_steps=30,
                          progress=False))
    proc = subprocess.run([sys.executable, "-m", "distill", "export", tmp_path / "student", "--out", tmp_path / "export",
                           "--tflite", "--tflite-int8", "full", "--check-rows", "16", "--calibration-rows", "48",
                           "--onnx"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "full integer, calibrated on 48 images" in proc.stdout
    doc = json.loads((tmp_path / "export" / "export.json").read_text())
    assert doc["student"]["arch"] == "mobilefacenet" and doc["report"]["int8"] == "full"
    assert doc["report"]["calibration_rows"] == 48 and doc["report"]["tflite_cosine"]["int8"]["min"] >= 0.9
    assert doc["report"]["onnx_opset"] == 17 and doc["report"]["onnx_max_abs_diff"] <= 1e-4
    assert "onnx" in proc.stdout and "onnxruntime" in proc.stdout

    import onnxruntime
    import tensorflow as tf

    session = onnxruntime.InferenceSession(str(tmp_path / "export" / "student.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)" and not isinstance(inp.shape[0], int)  # any batch
    loaded = tf.saved_model.load(str(tmp_path / "export" / "saved_model"))
    five = check_images(str(embedded_run), 69, (112, 112))[64:]
    want = loaded.signatures["serving_default"](images=tf.constant(five))["embeddings"].numpy()
    np.testing.assert_allclose(session.run(None, {"images": five})[0], want, atol=1e-4)
    # evaluate reads student.onnx as the student it is (uint8 in), beside the export's SavedModel.
    from distill.evaluate.run import Embedder, trained_on
    from distill.teacher import Preprocessing

    student = Embedder(str(tmp_path / "export" / "student.onnx"), Preprocessing())
    assert (student.kind, student.height, student.width) == ("student", 112, 112)
    np.testing.assert_allclose(student(five), want, atol=1e-4)
    assert trained_on(str(tmp_path / "export" / "student.onnx")) == trained_on(str(tmp_path / "export")) == str(embedded_run)

    path = str(tmp_path / "export" / "student_int8.tflite")
    interpreter = tf.lite.Interpreter(model_path=path)
    kinds = {d["dtype"] for d in interpreter.get_tensor_details()}
    assert np.int8 in kinds  # activations are int8, not only the weights
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    assert inp["dtype"] == np.uint8 and out["dtype"] == np.float32
    images = check_images(str(embedded_run), 80, (112, 112))[64:]  # beyond the check's and calibration's rows
    ref = run_tflite(str(tmp_path / "export" / "student_float16.tflite"), images)
    assert cosine_agreement(run_tflite(path, images), ref)["min"] > 0.9
