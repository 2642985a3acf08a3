"""The local copy of an object-store directory (``distill/mirror.py``) pulled and pushed against a
real S3 API server on loopback (moto_server); its pure rules are tests/unit/test_mirror.py."""

from __future__ import annotations

import os

import numpy as np
import pytest

from distill.mirror import MARKER, RUN_SKIP, RUN_UNITS, Mirror

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3(s3_session):
    s3_session.make_bucket("bkt")
    return s3_session


def _write(root, rel: str, data: bytes) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_push_publishes_units_marker_last_and_a_fresh_copy_pulls_the_same_bytes(aws, tmp_path):
    uri = "s3://bkt/t1/student"
    m = Mirror.open(uri, units=RUN_UNITS, skip=RUN_SKIP)
    _write(m.local, "checkpoints/ckpt-000000003/state.npz", b"s" * 5000)
    _write(m.local, "checkpoints/ckpt-000000003/cursor.json", b"{}")
    _write(m.local, "metrics.jsonl", b'{"step": 1}\n')
    m.push()
    keys = aws.keys("bkt", "t1/student/")
    assert set(keys) == {"t1/student/checkpoints/ckpt-000000003/state.npz", "t1/student/metrics.jsonl",
                         "t1/student/checkpoints/ckpt-000000003/cursor.json",
                         f"t1/student/checkpoints/ckpt-000000003/{MARKER}"}
    # Another machine (another cache) pulls the finished state, byte for byte.
    other = Mirror.open(uri, units=RUN_UNITS, skip=RUN_SKIP, local=str(tmp_path / "elsewhere"))
    other.pull()
    with open(os.path.join(other.local, "checkpoints/ckpt-000000003/state.npz"), "rb") as f:
        assert f.read() == b"s" * 5000
    with open(os.path.join(other.local, "metrics.jsonl"), "rb") as f:
        assert f.read() == b'{"step": 1}\n'
    # A checkpoint dropped locally (the last few are kept) is unpublished; a new one published.
    import shutil

    shutil.rmtree(os.path.join(m.local, "checkpoints/ckpt-000000003"))
    _write(m.local, "checkpoints/ckpt-000000006/cursor.json", b'{"step": 6}')
    m.push()
    assert not any("ckpt-000000003" in k for k in aws.keys("bkt", "t1/student/"))
    other.pull()
    assert sorted(os.listdir(os.path.join(other.local, "checkpoints"))) == ["ckpt-000000006"]


def test_a_unit_without_its_marker_is_passed_over_and_dropped_from_a_stale_copy(aws, tmp_path):
    """A checkpoint whose upload was killed before its marker is never taken for finished, and a
    copy that holds something the store does not (never published) is made the store's again."""
    uri = "s3://bkt/t2/student"
    m = Mirror.open(uri, units=RUN_UNITS, skip=RUN_SKIP)
    _write(m.local, "checkpoints/ckpt-000000003/cursor.json", b'{"step": 3}')
    m.push()
    client = aws.client()
    client.put_object(Bucket="bkt", Key="t2/student/checkpoints/ckpt-000000009/cursor.json", Body=b'{"step": 9}')
    client.put_object(Bucket="bkt", Key="t2/student/ray/run/checkpoint_0/x", Body=b"ray's own")
    _write(m.local, "checkpoints/ckpt-000000012/cursor.json", b'{"step": 12}')  # local only: never pushed
    m.pull()
    assert sorted(os.listdir(os.path.join(m.local, "checkpoints"))) == ["ckpt-000000003"]
    assert not os.path.exists(os.path.join(m.local, "ray"))  # Ray Train's storage is Ray's
    # A marker that no longer matches (a file replaced under it) fails the unit too.
    client.put_object(Bucket="bkt", Key="t2/student/checkpoints/ckpt-000000003/cursor.json", Body=b'{"step": 33}')
    fresh = Mirror.open(uri, units=RUN_UNITS, skip=RUN_SKIP, local=str(tmp_path / "fresh"))
    fresh.pull()
    assert not os.path.exists(os.path.join(fresh.local, "checkpoints"))


def test_a_whole_tree_unit_replaces_its_old_version(aws, tmp_path):
    uri = "s3://bkt/t3/export"
    m = Mirror.open(uri, units=("",))
    _write(m.local, "saved_model/saved_model.pb", b"v1")
    _write(m.local, "old.tflite", b"old")
    m.push()
    os.unlink(os.path.join(m.local, "old.tflite"))
    _write(m.local, "saved_model/saved_model.pb", b"v2-longer")
    m.push()
    assert set(aws.keys("bkt", "t3/export/")) == {"t3/export/saved_model/saved_model.pb", f"t3/export/{MARKER}"}
    reader = Mirror.open(uri, units=("",), local=str(tmp_path / "reader"))
    reader.pull()
    with open(os.path.join(reader.local, "saved_model/saved_model.pb"), "rb") as f:
        assert f.read() == b"v2-longer"


def test_the_newest_whole_ray_train_checkpoint_on_the_store_is_found_and_a_partial_one_passed_over(aws, tmp_path):
    import json

    from distill.train.checkpoints import Cursor, read_checkpoint, store_ray_checkpoint

    client = aws.client()

    def put(ckpt: str, step: int, files=("config.json", "cursor.json", "state.npz")):
        cursor = Cursor(0, step * 4, step, 0, 2, 4, 8, "run")
        for name in files:
            body = json.dumps(cursor.__dict__) if name == "cursor.json" else "{}" if name == "config.json" else b"npz"
            client.put_object(Bucket="bkt", Key=f"t4/student/ray/train/{ckpt}/{name}", Body=body)

    assert store_ray_checkpoint("s3://bkt/t4/student", str(tmp_path / "none")) is None
    put("checkpoint_000000", 3)
    put("checkpoint_000001", 6)
    put("checkpoint_000002", 9, files=("config.json", "cursor.json"))  # its state.npz never arrived
    got = store_ray_checkpoint("s3://bkt/t4/student", str(tmp_path / "dl"))
    assert got == str(tmp_path / "dl") and read_checkpoint(got)[1].step == 6


def test_a_teacher_on_the_store_is_fetched_once_and_one_changed_under_a_run_is_refused(aws, tmp_path):
    from distill.teacher import TeacherError, fetch_teacher, teacher_fingerprint

    client = aws.client()
    for rel, body in (("saved_model.pb", b"graph"), ("variables/variables.index", b"index")):
        client.put_object(Bucket="bkt", Key=f"t5/teacher/{rel}", Body=body)
    path = fetch_teacher("s3://bkt/t5/teacher")
    with open(os.path.join(path, "variables", "variables.index"), "rb") as f:
        assert f.read() == b"index"
    fp = teacher_fingerprint(path)
    assert fetch_teacher("s3://bkt/t5/teacher", fp) == path  # the driver's fingerprint: the same teacher
    client.put_object(Bucket="bkt", Key="t5/teacher/saved_model.pb", Body=b"another")
    with pytest.raises(TeacherError, match="is not the one this run started with"):
        fetch_teacher("s3://bkt/t5/teacher", fp)
    with pytest.raises(TeacherError, match="does not exist"):
        fetch_teacher("s3://bkt/t5/nothing")


def test_an_onnx_teacher_on_the_store_comes_with_its_weight_file_and_the_same_fingerprint(aws, tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from distill.teacher import TeacherError, fetch_teacher, inspect_teacher, teacher_fingerprint

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3, 1, 1), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("GlobalAveragePool", ["c"], ["p"]),
         helper.make_node("Flatten", ["p"], ["embedding"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", 4])], initializer=[w])
    local = tmp_path / "model.onnx"
    onnx.save_model(helper.make_model(graph), str(local), save_as_external_data=True, location="model.weights",
                    size_threshold=0)
    client = aws.client()
    for name in ("model.onnx", "model.weights"):
        client.put_object(Bucket="bkt", Key=f"t6/{name}", Body=(tmp_path / name).read_bytes())
    path = fetch_teacher("s3://bkt/t6/model.onnx")
    assert os.path.isfile(os.path.join(os.path.dirname(path), "model.weights"))  # beside the model, as it names it
    fp = teacher_fingerprint(path)
    assert fp == teacher_fingerprint(str(local))
    assert inspect_teacher(path).layout == "NCHW"
    assert fetch_teacher("s3://bkt/t6/model.onnx", fp) == path
    client.put_object(Bucket="bkt", Key="t6/model.weights", Body=b"\0" * 52)  # the weights replaced on the store
    with pytest.raises(TeacherError, match="is not the one this run started with"):
        fetch_teacher("s3://bkt/t6/model.onnx", fp)
    with pytest.raises(TeacherError, match="does not exist"):
        fetch_teacher("s3://bkt/t6/other.onnx")
