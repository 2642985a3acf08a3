"""`distill evaluate` end to end on real faces with the real mobilefacenet teacher.

The "student" here is the teacher wrapped the way `distill export` ships students (uint8
RGB in, preprocessing inside, L2-normalised out), so both model kinds run and the
teacher-student cosine has a known answer: 1.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import MOBILEFACENET, ORL
from support import write_tiny_bin

from distill.evaluate.run import EvaluateConfig, run_evaluate

pytestmark = pytest.mark.integration

TEACHER = str(MOBILEFACENET)


def _orl_folders(dst, people=6, per_person=5):
    for p in range(1, people + 1):
        os.makedirs(dst / f"s{p}")
        for k in range(1, per_person + 1):
            shutil.copy(os.path.join(ORL, f"s{p}", f"{k}.pgm"), dst / f"s{p}" / f"{k}.pgm")
    return dst


@pytest.fixture(scope="module")
def wrapped_student(tmp_path_factory):
    import tensorflow as tf

    out = str(tmp_path_factory.mktemp("student") / "export")
    teacher = tf.saved_model.load(TEACHER)
    fn = teacher.signatures["serving_default"]

    class _Student(tf.Module):
        def __init__(self):
            super().__init__()
            self.teacher = teacher

        @tf.function(input_signature=[tf.TensorSpec([None, 112, 112, 3], tf.uint8, name="images")])
        def serve(self, images):
            x = (tf.cast(images, tf.float32) - 127.5) / 128.0
            return {"embeddings": tf.math.l2_normalize(fn(input=x)["embeddings"], axis=1)}

    m = _Student()
    tf.saved_model.save(m, out, signatures={"serving_default": m.serve.get_concrete_function()})
    return out


def test_folders_student_and_teacher(tmp_path, wrapped_student, caplog):
    folders = _orl_folders(tmp_path / "faces")
    out = tmp_path / "r.json"
    results = run_evaluate(EvaluateConfig(model=wrapped_student, folders=str(folders), teacher=TEACHER, out=str(out)))
    assert results["kinds"] == {"model": "student", "teacher": "teacher"}
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))  # one shape, even for one set
    r, = results["targets"]
    assert r["dataset"]["images"] == 30 and r["dataset"]["pairs"] == 30 * 29 // 2
    assert r["dataset"]["same_pairs"] == 6 * 10 and not r["dataset"]["sampled"] and r["dataset"]["all_impostor_pairs"]
    assert r["mean_cosine"] == pytest.approx(1.0, abs=1e-4)
    for role in ("model", "teacher"):
        m = r["models"][role]
        assert m["auc"] > 0.9  # a real face model on real (grey, resized) faces
        assert len(m["fold_accuracies"]) == 10 and m["accuracy_mean"] == pytest.approx(np.mean(m["fold_accuracies"]))
        assert m["accuracy_mean"] > r["dataset"]["chance_accuracy"] and -1 < m["threshold_cosine"] < 1
        assert m["same_cosine"] > m["different_cosine"] and not m["collapsed"]
        assert m["tar_at_far"] == {"1e-02": None, "1e-03": None, "1e-04": None}  # 375 impostor pairs support none
    assert r["models"]["model"]["auc"] == pytest.approx(r["models"]["teacher"]["auc"], abs=1e-3)

    # A broken file is skipped and named, its pairs dropped; a sample reads only what it pairs,
    # and holds distinct pairs (the flip test on: two model calls a batch).
    (folders / "s1" / "9.pgm").write_bytes(b"P5 not really an image")
    sampled = run_evaluate(EvaluateConfig(model=wrapped_student, folders=str(folders), pairs=200, seed=3,
                                          flip_test=True))["targets"][0]
    assert sampled["dataset"]["sampled"] and sampled["dataset"]["skipped"] <= 1 and sampled["dataset"]["flip_test"]
    # 100 same pairs asked, 65 exist: all 65 and 100 different ones, less those of the broken file.
    assert 140 <= sampled["dataset"]["pairs"] <= 165 and sampled["dataset"]["all_same_pairs"]
    assert sampled["dataset"]["pairs_requested"] == 200 and sampled["dataset"]["seed"] == 3
    assert sampled["models"]["model"]["auc"] > 0.9
    # Asking for more pairs than exist: every distinct pair, once, and a warning that says so.
    with caplog.at_level("WARNING", logger="distill.evaluate.run"):
        full = run_evaluate(EvaluateConfig(model=wrapped_student, folders=str(folders), pairs=20000,
                                           progress=False))["targets"][0]
    assert "asks for 10000 same-person pairs and only 65 distinct ones exist" in caplog.text
    assert full["dataset"]["skipped"] == 1 and full["dataset"]["images"] == 30
    assert full["dataset"]["pairs"] == 30 * 29 // 2 and not full["dataset"]["sampled"]
    assert (full["dataset"]["same_pairs_available"], full["dataset"]["impostor_pairs_available"]) == (65, 400)


def test_bin_protocol_via_cli(tmp_path, wrapped_student):
    path = write_tiny_bin(tmp_path / "tiny.bin")
    out = tmp_path / "bin.json"
    proc = subprocess.run(
        [sys.executable, "-m", "distill", "evaluate", wrapped_student, "--bin", str(path), "--teacher", TEACHER,
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "flip test, 10 folds" in proc.stdout and "mean teacher-student cosine" in proc.stdout
    assert "sq-L2 thr" in proc.stdout and "cos thr" not in proc.stdout
    assert "TAR@FAR: shown where distinct impostor pairs x FAR >= 10" in proc.stdout
    r, = json.loads(out.read_text())["targets"]
    m = r["models"]["model"]
    assert len(m["fold_accuracies"]) == 10 and len(m["fold_thresholds_sq_l2"]) == 10
    assert m["accuracy_mean"] == pytest.approx(np.mean(m["fold_accuracies"]))
    assert m["accuracy_mean"] >= 0.8 and m["auc"] > 0.9 and not m["collapsed"]
    assert 0.0 <= m["threshold_sq_l2"] < 4.0
    assert r["mean_cosine"] == pytest.approx(1.0, abs=1e-4)


def test_several_sets_in_one_call_one_model_load_json_on_stdout(tmp_path, wrapped_student):
    a = _orl_folders(tmp_path / "a", people=3, per_person=4)
    b = tmp_path / "b"
    os.makedirs(b)
    for p in (7, 8, 9):  # other people than a's
        shutil.copytree(os.path.join(ORL, f"s{p}"), b / f"s{p}")
    tiny = write_tiny_bin(tmp_path / "tiny.bin")
    proc = subprocess.run([sys.executable, "-m", "distill", "evaluate", wrapped_student, "--folders", f"{a},{b}",
                           "--bin", str(tiny), "--teacher", TEACHER, "--json", "--no-progress",
                           "--plot", str(tmp_path / "plots" / "roc.png")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)  # stdout is the JSON alone
    assert results["format"] == "distill-evaluate/2" and "10" in results["tar_at_far_rule"]["rule"]
    every = results["targets"]
    assert [(t["dataset"]["kind"], t["dataset"]["path"]) for t in every] == [
        ("folders", str(a)), ("folders", str(b)), ("bin", str(tiny))]
    assert every[0]["dataset"]["images"] == 12 and every[1]["dataset"]["images"] == 30
    alone = run_evaluate(EvaluateConfig(model=wrapped_student, folders=str(b), progress=False))
    assert every[1]["models"]["model"]["auc"] == pytest.approx(alone["targets"][0]["models"]["model"]["auc"], abs=1e-9)
    assert len(every[2]["models"]["model"]["fold_accuracies"]) == 10
    assert all(t["mean_cosine"] == pytest.approx(1.0, abs=1e-4) for t in every)
    from PIL import Image

    with Image.open(tmp_path / "plots" / "roc.png") as png:  # 3 sets x (student, teacher) on one axis
        assert png.format == "PNG" and png.size == (760, 520) and len(png.getcolors(1 << 16)) > 8

    twice = subprocess.run([sys.executable, "-m", "distill", "evaluate", wrapped_student, "--folders", f"{a},{a}"],
                           capture_output=True, text=True, timeout=600)
    assert twice.returncode == 2 and "given twice" in twice.stderr


def test_malicious_bin_via_cli_is_refused_cleanly(tmp_path, wrapped_student):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], [Evil()])))
    proc = subprocess.run(
        [sys.executable, "-m", "distill", "evaluate", wrapped_student, "--bin", str(path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2
    assert "refusing to load posix.system" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_the_teacher_is_fed_as_its_shards_recorded(tmp_path, wrapped_student, embedded_run, tiny_teacher):
    """--shards: the teacher, its preprocessing and its output come from the run's manifest; an
    option that contradicts the record, or another teacher, is refused in one line."""
    folders = _orl_folders(tmp_path / "faces", people=3, per_person=3)
    out = tmp_path / "r.json"
    ok = subprocess.run([sys.executable, "-m", "distill", "evaluate", wrapped_student, "--folders", folders,
                         "--shards", embedded_run, "--out", out, "--no-progress"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "cos thr" in ok.stdout and "accuracy: 10 folds of the shuffled pairs, each scored at" in ok.stdout
    r = json.loads(out.read_text())
    assert r["paths"]["teacher"] == str(tiny_teacher) and r["kinds"]["teacher"] == "teacher"
    assert r["preprocessing_from"] == str(embedded_run / "manifest.json")
    assert r["preprocessing"] == json.loads((embedded_run / "manifest.json").read_text())["preprocessing"]

    # Refused before any model loads (so in-process here; the CLI prints these as one line).
    from distill.errors import IncompatibleRun

    with pytest.raises(IncompatibleRun, match=r"--channel-order BGR \(recorded: RGB\)"):
        run_evaluate(EvaluateConfig(model=wrapped_student, folders=str(folders), shards=str(embedded_run),
                                    channel_order="BGR"))
    with pytest.raises(IncompatibleRun, match="is not the teacher that embedded"):
        run_evaluate(EvaluateConfig(model=wrapped_student, folders=str(folders), shards=str(embedded_run),
                                    teacher=TEACHER))
