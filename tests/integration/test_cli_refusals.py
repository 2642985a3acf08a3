"""Refusals of `distill` in a real process: a bad option or path, an --out that cannot be made, a
ledger that cannot be reached: one line, exit 2, before TensorFlow or Ray is imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("argv", [
    ["train", "SHARDS", "--out", "OUT", "--batch-size", "0"],
    ["train", "NOWHERE", "--out", "OUT"],
    ["export", "NOWHERE", "--out", "OUT"],
    ["evaluate", "NOWHERE", "--folders", "SHARDS"],
    ["demo", "--epochs", "0", "--out", "OUT"],
    ["listing", "NOWHERE", "--out", "OUT/l.parquet"],
])
def test_a_bad_option_or_path_is_refused_before_tensorflow_or_ray_is_imported(tmp_path, argv):
    """What makes a refusal take well under a second: nothing heavy is imported for it."""
    argv = [str(tmp_path / a) if a in ("SHARDS", "NOWHERE", "OUT", "OUT/l.parquet") else a for a in argv]
    (tmp_path / "SHARDS").mkdir()
    code = ("import sys, json; from distill.cli import main; rc = main(json.loads(sys.argv[1])); "
            "print(rc, 'tensorflow' in sys.modules, 'ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["2", "False", "False"], r.stderr[-2000:]
    assert "error:" in r.stderr and "Traceback" not in r.stderr


def test_an_out_that_cannot_be_made_and_a_ledger_that_cannot_be_reached_leave_nothing_behind(tmp_path):
    from conftest import MOBILEFACENET, ORL

    from distill.cli import main

    (tmp_path / "afile").write_text("in the way")
    listing = tmp_path / "l.parquet"
    assert main(["listing", str(ORL), "--out", str(listing)]) == 0
    code = "import sys, json; from distill.cli import main; sys.exit(main(json.loads(sys.argv[1])))"
    for argv, says in (
        (["listing", str(ORL), "--out", str(tmp_path / "afile" / "l.parquet")], "--out"),
        (["embed", str(listing), "--teacher", str(MOBILEFACENET), "--out", str(tmp_path / "afile" / "shards")], "--out"),
        (["embed", str(listing), "--teacher", str(MOBILEFACENET), "--out", str(tmp_path / "shards"),
          "--ledger", "redis://127.0.0.1:1/0"], "cannot connect to the Redis ledger"),
    ):
        r = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "shards").exists()  # the unreachable ledger was found before anything was written


def test_refusals_of_evaluate_folders_come_before_tensorflow_or_ray(tmp_path):
    """The pattern of test_cli: each refused in one line, exit 2, nothing heavy imported."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "saved_model.pb").write_bytes(b"")
    flat, one, unreadable = tmp_path / "flat", tmp_path / "one" / "alice", tmp_path / "bad"
    for d, names in ((flat, ["1.jpg", "2.jpg"]), (one, ["1.jpg", "2.jpg"]), (unreadable / "a", ["1.jpg", "2.jpg"]),
                     (unreadable / "b", ["1.png"])):
        d.mkdir(parents=True)
        for n in names:
            (d / n).write_bytes(b"not an image")
    argvs = [["evaluate", str(model), "--folders", str(f)] for f in (flat, tmp_path / "one", unreadable)]
    code = ("import sys, json; from distill.cli import main\n"
            "for argv in json.loads(sys.argv[1]): print(main(argv))\n"
            "print('tensorflow' in sys.modules, 'ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(argvs)], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["2", "2", "2", "False", "False"], r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 3 and "Traceback" not in r.stderr
    assert "no identity sub-folders" in errors[0] and "at least two people" in errors[1]
    assert "none of its 3 images can be decoded" in errors[2]
    assert all("--folders" in e for e in errors)


def test_validation_paths_that_are_not_there_are_refused_before_tensorflow(tmp_path):
    import subprocess
    import sys

    (tmp_path / "shards").mkdir()
    for flag, path in (("--val-bin", tmp_path / "lfw.bin"), ("--val-folders", tmp_path / "people")):
        proc = subprocess.run([sys.executable, "-m", "distill", "train", tmp_path / "shards", "--out", tmp_path / "o",
                               flag, path],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and f"{flag} {path}: no such" in proc.stderr
        assert not (tmp_path / "o").exists()
