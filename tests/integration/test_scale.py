"""Many people, labelled and not: a CelebA + UTKFace subset listed as two sources, embedded by
the real mobilefacenet teacher, distilled into a MobileFaceNet student (the classifier on the
labelled rows only) scored on people it never saw, exported and evaluated.
How close such a student gets to its teacher is measured where runs are long enough to say it:
bench/quality_scale.py, docs/QUALITY.md. (Views, TFLite and Ray Train have tests of their own:
test_glint_views, test_export, test_object_store.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import GLINT12, MOBILEFACENET, run_cli
from support import SHARED

pytestmark = pytest.mark.integration

CELEBA, UTKFACE = SHARED / "data" / "celeba", SHARED / "data" / "utkface"
PEOPLE, UNLABELLED, BATCH, EPOCHS = 150, 400, 32, 2


def _link(src: Path, names: list[str], dst: Path) -> Path:
    dst.mkdir(parents=True)
    for n in names:
        (dst / n).symlink_to(src / n)
    return dst


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, ray_address):
    """Listing and shards of 150 CelebA people (their folders) and 400 UTKFace faces (a flat
    folder: unlabelled), embedded by the real teacher (the image and its mirror)."""
    if not (CELEBA.is_dir() and UTKFACE.is_dir()):
        pytest.skip("../shared/data/celeba and utkface are not here")
    root = tmp_path_factory.mktemp("mixed")
    people = sorted(p.name for p in CELEBA.iterdir())
    people = [p for p in people if len(list((CELEBA / p).iterdir())) >= 2][:PEOPLE]
    _link(CELEBA, people, root / "celeba")
    _link(UTKFACE, sorted(p.name for p in UTKFACE.iterdir())[:UNLABELLED], root / "utk")
    out = run_cli("listing", root / "celeba", root / "utk", "--out", root / "listing.parquet").stdout
    assert f"{UNLABELLED} rows unlabelled" in out and f"{PEOPLE} classes" in out
    run_cli("embed", root / "listing.parquet", "--teacher", MOBILEFACENET, "--out", root / "shards",
            "--shard-size", 128, "--address", ray_address, "--no-progress")
    status = run_cli("status", root / "shards").stdout
    assert f"{UNLABELLED} unlabelled" in status
    held = _link(GLINT12, sorted(p.name for p in GLINT12.iterdir())[:4], root / "unseen-full")
    unseen = root / "unseen"  # 4 glint12 people, 12 images each: people no student here trains on
    for p in held.iterdir():
        (unseen / p.name).mkdir(parents=True)
        for f in sorted(p.iterdir())[:12]:
            (unseen / p.name / f.name).symlink_to(f.resolve())
    return root


def _train(mixed: Path, out: Path, *extra):
    return run_cli("train", mixed / "shards", "--out", out, "--student", "mobilefacenet", "--resolution", 64,
                   "--epochs", EPOCHS, "--batch-size", BATCH, "--lr", 4e-3, "--warmup-steps", 10, "--ce-weight", 0.1,
                   "--margin", "arcface", "--val-folders", mixed / "unseen", "--val-images", 48, "--shuffle-buffer", 128,
                   "--checkpoint-every", 1000, "--trace-samples", "--no-progress", *extra)


def test_a_mobilefacenet_student_on_labelled_and_unlabelled_rows_is_scored_on_unseen_people(mixed, tmp_path):
    out = tmp_path / "student"
    rows = json.loads((mixed / "shards" / "manifest.json").read_text())["rows"]
    steps = EPOCHS * (rows // BATCH)
    # One run: a stop and resume mid-epoch are tested where the student is cheaper (test_train,
    # test_glint_views, test_object_store); what this adds is many people, labelled and not.
    trained = _train(mixed, out)
    assert f"trained to step {steps}" in trained.stdout
    trace = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    assert [t["step"] for t in trace] == list(range(1, steps + 1))
    for epoch in range(EPOCHS):  # every sample of every epoch once, unlabelled ones included
        seen = [i for t in trace if t["epoch"] == epoch for i in t["index"]]
        assert len(seen) == len(set(seen)) == (rows // BATCH) * BATCH
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_cos" in r]
    assert [v["step"] for v in val] == [e * (rows // BATCH) for e in range(EPOCHS + 1)]  # the start, each epoch end
    assert any("ce" in r for r in records if r["kind"] == "step")  # the classifier ran on the labelled rows
    config = json.loads(next((out / "checkpoints").iterdir()).joinpath("config.json").read_text())
    assert (config["student"]["arch"], config["student"]["resolution"], config["student"]["num_classes"]) == (
        "mobilefacenet", 64, PEOPLE)

    export = run_cli("export", out, "--out", tmp_path / "export").stdout
    assert "images uint8 [N,112,112,3] -> embeddings float32 [N,192]" in export
    assert "computes at 64x64: resizes its 112x112 input inside" in export
    report = json.loads((tmp_path / "export" / "export.json").read_text())
    assert report["student"]["arch"] == "mobilefacenet"
    scored = run_cli("evaluate", tmp_path / "export", "--folders", mixed / "unseen", "--teacher", MOBILEFACENET,
                     "--out", tmp_path / "eval.json", "--no-progress")
    assert scored.stdout.startswith("model: student, computes at 64x64: resizes its 112x112 input inside\n")
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["computes_at"] == {"model": "computes at 64x64: resizes its 112x112 input inside"}
    result = results["targets"][0]
    assert np.isfinite(result["mean_cosine"]) and result["models"]["teacher"]["auc"] > 0.9, scored.stdout
