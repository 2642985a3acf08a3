"""ONNX teachers end to end: the shared MobileFaceNet SavedModel converted to ONNX here (tf2onnx,
as `distill export --onnx` does), an NCHW variant made from it the way insightface's models take
their input, then the real CLI: the pass on Ray actors against the SavedModel on the same faces,
SIGKILL and rerun to the same bytes, and evaluate scoring either file alike."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
from conftest import MOBILEFACENET, ORL, run_cli
from onnx import helper
from test_embed import SUBSET_ARGS, _start, _wait_for_shards, embed_args, shard_bytes

pytestmark = pytest.mark.integration

# What an ONNX teacher may differ from its SavedModel by, per row (the teacher's raw embeddings
# have norms near 70 here): measured 2.6e-5 at most on 64 glint12 faces, cosine 0.9999999.
MAX_ABS, MIN_COS = 1e-3, 0.99999


@pytest.fixture(scope="module")
def onnx_teachers(tmp_path_factory) -> dict[str, Path]:
    """{"NHWC": the converted file, "NCHW": the same graph behind a transpose taking [N, 3, H, W]}."""
    d = tmp_path_factory.mktemp("onnx")
    nhwc = d / "mobilefacenet.onnx"
    proc = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(MOBILEFACENET),
                           "--opset", "17", "--output", str(nhwc)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = onnx.load(str(nhwc))
    (inp,) = model.graph.input
    inner = "input_nhwc"
    for node in model.graph.node:
        node.input[:] = [inner if name == inp.name else name for name in node.input]
    model.graph.node.insert(0, helper.make_node("Transpose", ["input.1"], [inner], perm=[0, 2, 3, 1]))
    del model.graph.input[:]
    model.graph.input.append(helper.make_tensor_value_info("input.1", onnx.TensorProto.FLOAT, ["batch", 3, 112, 112]))
    nchw = d / "mobilefacenet-nchw.onnx"
    onnx.save_model(model, str(nchw))
    return {"NHWC": nhwc, "NCHW": nchw}


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    """10 ORL people, 10 faces each (grey 92x112, resized to the teacher's 112x112)."""
    d = tmp_path_factory.mktemp("subset")
    lines = [f"{ORL / f's{p}' / f'{i}.pgm'}\t{p - 1}" for p in range(1, 11) for i in range(1, 11)]
    (d / "list.txt").write_text("\n".join(lines) + "\n")
    run_cli("listing", d / "list.txt", "--out", d / "listing.parquet")
    return d / "listing.parquet"


@pytest.fixture(scope="module")
def onnx_run(tmp_path_factory, subset, onnx_teachers, ray_address) -> Path:
    """An uninterrupted pass with the NCHW ONNX teacher: the bytes a killed one must come back to."""
    out = tmp_path_factory.mktemp("onnx-run") / "shards"
    r = run_cli(*embed_args(subset, onnx_teachers["NCHW"], out, ray_address, *SUBSET_ARGS))
    assert "embed complete: 100/100 rows" in r.stdout
    assert "teacher actor ready: ONNX on onnxruntime" in r.stderr and "CPUExecutionProvider" in r.stderr
    return out


def _rows(shards: Path) -> dict[str, np.ndarray]:
    tables = [pq.read_table(p) for p in sorted(shards.glob("part-*.parquet"))]
    cols = {c: np.concatenate([np.asarray(t.column(c).to_pylist(), np.float32) for t in tables])
            for c in ("embedding", "embedding_flip")}
    cols["index"] = np.concatenate([t.column("index").to_numpy() for t in tables])
    cols["path"] = sum((t.column("path").to_pylist() for t in tables), [])
    return cols


def test_the_onnx_pass_equals_the_savedmodel_on_the_same_faces(onnx_run, onnx_teachers):
    from distill.images import prepare, read_file
    from distill.teacher import Preprocessing, inspect_teacher, load_teacher

    m = json.loads((onnx_run / "manifest.json").read_text())
    assert m["teacher_format"] == "onnx" and m["teacher_signature"]["layout"] == "NCHW"
    assert m["teacher_signature"]["input"] == "input.1" and m["embedding_dim"] == 192
    assert m["versions"]["onnxruntime"] not in ("", "not installed")
    rows = _rows(onnx_run)
    assert list(rows["index"]) == list(range(100))
    pixels = np.stack([prepare(read_file(p), 112, 112)[0] for p in rows["path"]])
    reference = load_teacher(inspect_teacher(str(MOBILEFACENET)), Preprocessing())  # the SavedModel, on TensorFlow
    for column, batch in (("embedding", pixels), ("embedding_flip", pixels[:, :, ::-1])):
        want = np.concatenate([reference(batch[a:a + 50]) for a in range(0, len(batch), 50)])
        got = rows[column]
        cos = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
        assert cos.min() >= MIN_COS, column
        assert np.abs(want - got).max() <= MAX_ABS, column
    # The NHWC file is the same teacher: the same embeddings on the same batch, either layout.
    nhwc = load_teacher(inspect_teacher(str(onnx_teachers["NHWC"])), Preprocessing(), threads=2)
    assert nhwc.spec.layout == "NHWC"
    np.testing.assert_allclose(nhwc(pixels[:8]), rows["embedding"][:8], rtol=0, atol=MAX_ABS)


def test_sigkill_midway_then_rerun_is_byte_identical(tmp_path, subset, onnx_teachers, onnx_run, ray_address):
    out = tmp_path / "shards"
    args = embed_args(subset, onnx_teachers["NCHW"], out, ray_address, *SUBSET_ARGS)
    proc = _start(args)
    have = _wait_for_shards(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert have < 13, "the run finished before it could be killed; make it slower"
    partial = shard_bytes(out)
    r = run_cli(*args)
    assert "embed complete: 100/100 rows" in r.stdout
    assert shard_bytes(out) == shard_bytes(onnx_run)
    assert all(shard_bytes(out)[name] == data for name, data in partial.items())  # done shards not rewritten
    assert (out / "manifest.json").read_bytes() == (onnx_run / "manifest.json").read_bytes()
    # Another teacher file into the same run is refused, naming the fingerprint.
    other = run_cli(*embed_args(subset, onnx_teachers["NHWC"], out, ray_address, *SUBSET_ARGS), check=False)
    assert other.returncode != 0 and "teacher_fingerprint" in other.stderr + other.stdout


def test_evaluate_scores_the_onnx_teacher_as_the_savedmodel(tmp_path, onnx_teachers, onnx_run):
    folders = tmp_path / "people"
    for p in range(11, 17):  # (people the pass never saw: evaluate reads the images itself)
        (folders / f"s{p}").mkdir(parents=True)
        for i in range(1, 11):
            (folders / f"s{p}" / f"{i}.pgm").write_bytes((ORL / f"s{p}" / f"{i}.pgm").read_bytes())
    # The SavedModel as the teacher, and quality gates: 1e-2 is supported by these 1,500 impostor
    # pairs, 1e-3 is not (it needs 10,000), so its gate fails with that reason and evaluate exits 1.
    r = run_cli("evaluate", onnx_teachers["NCHW"], "--teacher", MOBILEFACENET, "--folders", folders, "--json",
                "--no-progress", "--min-tar", "1e-2=0.01,1e-3=0.01", "--max-tar-gap", "1e-2=0.05", check=False)
    assert r.returncode == 1, r.stderr[-3000:]
    results = json.loads(r.stdout)
    (target,) = results["targets"]
    model, teacher = target["models"]["model"], target["models"]["teacher"]
    assert target["dataset"]["pairs"] == 60 * 59 // 2 and target["dataset"]["impostor_pairs"] == 1500
    assert abs(model["auc"] - teacher["auc"]) <= 1e-3 and teacher["auc"] > 0.9
    assert target["mean_cosine"] >= MIN_COS
    assert [(g["gate"], g["passed"]) for g in results["gates"]] == [
        ("--min-tar 1e-02=0.01", True), ("--min-tar 1e-03=0.01", False), ("--max-tar-gap 1e-02=0.05", True)]
    assert "not supported by this set's 1,500 distinct impostor pairs" in results["gates"][1]["reason"]
    # With the ONNX run's shards, evaluate feeds the ONNX teacher as its manifest recorded; the
    # tables show the gap (none: the same file twice).
    out = tmp_path / "eval.json"
    r = run_cli("evaluate", onnx_teachers["NCHW"], "--shards", onnx_run, "--folders", folders, "--out", out,
                "--no-progress", "--min-tar", "1e-2=0.01")
    assert "TAR gap, teacher minus model: at FAR 1e-02 +0.0000" in r.stdout
    assert f"gate --min-tar 1e-02=0.01 on {folders}: pass" in r.stdout
    again = json.loads(out.read_text())["targets"][0]["models"]
    assert again["model"]["auc"] == again["teacher"]["auc"] == model["auc"]
