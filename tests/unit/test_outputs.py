"""The output rule (distill.outputs): new, empty, or the verb's own; never one of the inputs."""

from __future__ import annotations

import json
import os

import pytest

from distill.errors import BadOption
from distill.outputs import (
    DEMO,
    EVALUATION,
    EXPORT,
    LISTING,
    NPY,
    PLOT,
    SHARDS,
    STUDENT,
    check_output,
    classify,
    overlap,
)


@pytest.mark.parametrize("entries, kind, want", [
    (None, SHARDS, "new"),
    ([], SHARDS, "empty"),
    ([".DS_Store"], EXPORT, "empty"),
    (["manifest.json", "part-00000.parquet", "_ledger"], SHARDS, "ours"),
    (["_ledger"], SHARDS, "ours"),  # (a ledger without the manifest yet: still the pass's)
    (["notes.txt"], SHARDS, "foreign"),
    (["listing.parquet", "shards", "student"], STUDENT, "foreign"),  # RUN itself, not RUN/student
    (["checkpoints"], STUDENT, "ours"),  # a run killed before its first checkpoint
    (["checkpoints", "metrics.jsonl", "tb", "best", "notes.txt"], STUDENT, "ours"),  # train never deletes notes.txt
    (["manifest.json", "part-00000.parquet"], STUDENT, "foreign"),  # the shards, as train's --out
    (["export.json", "saved_model", "checkpoint", "student_int8.tflite", "student.onnx"], EXPORT, "ours"),
    (["export.json", "saved_model", "checkpoint", ".export.old-x1"], EXPORT, "ours"),
    (["export.json", "saved_model", "my-notes.md"], EXPORT, "foreign"),  # replaced whole: notes would go
    (["saved_model"], EXPORT, "foreign"),  # someone's own SavedModel
    (["0_emb.npy", "0_img.foo"], NPY, "ours"),
    (["demo.json", "data"], DEMO, "ours"),
])
def test_classify(entries, kind, want):
    assert classify(entries, kind)[0] == want


def test_classify_names_what_is_in_the_way():
    assert classify(["export.json", "a.txt", "saved_model", "b"], EXPORT) == ("foreign", ["a.txt", "b"])


@pytest.mark.parametrize("out, inputs, want", [
    ("/r/student", {"SHARDS": "/r/shards"}, None),
    ("/r/shards", {"SHARDS": "/r/shards/"}, ("is", "SHARDS", "/r/shards/")),
    ("/r", {"STUDENT": "/r/student"}, ("contains", "STUDENT", "/r/student")),
    ("/r/student/export", {"STUDENT": "/r/student"}, ("is inside", "STUDENT", "/r/student")),
    ("/r/students", {"STUDENT": "/r/student"}, None),  # a shared prefix is not containment
    ("/r/x", {"--init": None, "--val-bin": ""}, None),
    ("s3://b/run", {"SHARDS": "s3://b/run/shards"}, ("contains", "SHARDS", "s3://b/run/shards")),
    ("s3://b/run/shards", {"SHARDS": "/b/run/shards"}, None),  # a bucket and a disk never meet
    ("s3://b/a", {"X": "s3://b/ab"}, None),
])
def test_overlap(out, inputs, want):
    assert overlap(out, inputs) == want


def test_overlap_sees_through_symlinks(tmp_path):
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "data", tmp_path / "link")
    assert overlap(str(tmp_path / "link" / "out"), [("SOURCE", str(tmp_path / "data"))])[0] == "is inside"


def test_check_output_on_disk(tmp_path):
    assert check_output(str(tmp_path / "new"), STUDENT) == "new"
    (tmp_path / "empty").mkdir()
    assert check_output(str(tmp_path / "empty"), EXPORT) == "empty"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(BadOption, match=r"--out .*mine is not empty and is no earlier output of `distill train` "
                                        r"\(it holds thesis.tex\); nothing was changed"):
        check_output(str(tmp_path / "mine"), STUDENT)
    (tmp_path / "f").write_text("x")
    with pytest.raises(BadOption, match="is a file; train writes a student directory there"):
        check_output(str(tmp_path / "f"), STUDENT)
    with pytest.raises(BadOption, match="is a directory; listing writes one file there"):
        check_output(str(tmp_path / "empty"), LISTING)
    with pytest.raises(BadOption, match=r"--out .*/r contains the input STUDENT .*; nothing was changed. Pass an "
                                        r"--out of its own, apart from the inputs \(e.g. --out .*/r/export\)"):
        check_output(str(tmp_path / "r"), EXPORT, {"STUDENT": str(tmp_path / "r" / "student")})


def test_files_are_replaced_only_when_distill_wrote_them(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1]}), other)
    with pytest.raises(BadOption, match="exists and is not a listing file distill wrote"):
        check_output(str(other), LISTING)
    listing = tmp_path / "listing.parquet"
    pq.write_table(pa.table({"x": [1]}).replace_schema_metadata({"distill.listing": "{}"}), listing)
    assert check_output(str(listing), LISTING) == "ours"

    notes = tmp_path / "results.json"
    notes.write_text(json.dumps({"mine": 1}))
    with pytest.raises(BadOption, match="not a results file distill wrote"):
        check_output(str(notes), EVALUATION)
    notes.write_text(json.dumps({"targets": []}))
    assert check_output(str(notes), EVALUATION) == "ours"

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    png = tmp_path / "roc.png"
    Image.new("RGB", (4, 4)).save(png)
    with pytest.raises(BadOption, match="--plot .* not a ROC plot distill wrote"):
        check_output(str(png), PLOT, option="--plot")
    info = PngInfo()
    info.add_text("Software", "distill evaluate")
    Image.new("RGB", (4, 4)).save(png, pnginfo=info)
    assert check_output(str(png), PLOT, option="--plot") == "ours"


def test_an_unreachable_store_is_refused_at_once(monkeypatch):
    """A closed port answers at once; no minute of retries first."""
    from distill.errors import Unreachable
    from distill.storage import probe_store

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # (discard: nothing listens here)
    probe_store.cache_clear()
    with pytest.raises(Unreachable, match=r"--out s3://b/run: the store at 127.0.0.1:9 does not answer"):
        check_output("s3://b/run", STUDENT)


@pytest.mark.parametrize("uri, env, want", [
    ("s3://b/k", {}, ("s3.us-east-1.amazonaws.com", 443)),
    ("s3://b/k", {"AWS_REGION": "eu-west-1"}, ("s3.eu-west-1.amazonaws.com", 443)),
    ("s3://b/k", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}, ("127.0.0.1", 9000)),
    ("s3://b/k", {"AWS_ENDPOINT_URL": "http://minio", "AWS_ENDPOINT_URL_S3": "https://r2.example"},
     ("r2.example", 443)),
    ("s3://b/k?endpoint_override=localhost:7000&scheme=http", {}, ("localhost", 7000)),
    ("gs://b/k", {}, ("storage.googleapis.com", 443)),
    ("hdfs://nn/x", {}, None),
])
def test_store_endpoint(uri, env, want):
    from distill.storage import store_endpoint

    assert store_endpoint(uri, env) == want
