"""Teacher views and validation on real faces (glint12): the student sees the teacher's exact
pixels, the stored targets are the teacher on those pixels, and a short training with views
and a held-out split learns, keeps its best epoch, and resumes mid-epoch on the planned order."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import GLINT12, run_cli

pytestmark = pytest.mark.integration

PEOPLE = ("Halle_Berry", "Hugh_Jackman", "James_Spader", "Keanu_Reeves", "Mark_Ruffalo", "Simon_Cowell")
PER_PERSON, VIEWS = 16, 2


def test_student_decodes_every_stored_jpeg_exactly_as_the_teacher_did():
    import tensorflow as tf

    from distill.images import decode_rgb
    from distill.train.stream import decode_stored

    files = sorted(GLINT12.glob("*/*.jpg"))
    assert len(files) == 4811
    differ = [f.name for f in files
              if not np.array_equal(decode_stored(tf.constant(f.read_bytes())).numpy(), decode_rgb(f.read_bytes()))]
    assert differ == []  # TF's default (fast DCT) decode differs on every one of these by up to ~20 levels


@pytest.fixture(scope="module")
def glint_views(tmp_path_factory, ray_address, tiny_teacher):
    """A 6-person glint12 subset embedded by the real CLI with --views 2 (tiny teacher)."""
    root = tmp_path_factory.mktemp("glint")
    src = root / "faces"
    for p in PEOPLE:
        (src / p).mkdir(parents=True)
        for f in sorted((GLINT12 / p).glob("*.jpg"))[:PER_PERSON]:
            (src / p / f.name).symlink_to(f)
    run_cli("listing", src, "--out", root / "listing.parquet")
    run_cli("embed", root / "listing.parquet", "--teacher", tiny_teacher, "--out", root / "shards", "--views", VIEWS,
            "--shard-size", 40, "--batch-size", 16, "--address", ray_address, "--no-progress")
    return root


def test_student_views_are_bit_identical_to_the_teachers(glint_views, tiny_teacher):
    import pyarrow.parquet as pq

    from distill.embed.listing import ListingReader
    from distill.shards.reader import open_shards
    from distill.teacher import Preprocessing, inspect_teacher
    from distill.train.order import plan_epoch
    from distill.train.stream import make_dataset
    from distill.views import ViewSpec
    from distill.workers.embed_actor import EmbedTask, EmbedWorker

    shards = open_shards(str(glint_views / "shards"))
    assert shards.views is not None and shards.views["count"] == VIEWS
    manifest = json.loads((glint_views / "shards" / "manifest.json").read_text())
    assert manifest["teacher_norm"]["rows"] == len(PEOPLE) * PER_PERSON and manifest["teacher_norm"]["mean"] > 0

    # The teacher's side: the embed actor's own batch code, without Ray.
    task = EmbedTask(teacher=inspect_teacher(str(tiny_teacher)), pre=Preprocessing(), out=str(glint_views / "scratch"),
                     run_id=shards.run_id, batch_size=16, views=ViewSpec.from_json(shards.views))
    worker = EmbedWorker(task)
    reader = ListingReader(str(glint_views / "listing.parquet"))
    total = reader.rows(0, len(PEOPLE) * PER_PERSON)
    batch = worker._load_batch(total, 0, len(PEOPLE) * PER_PERSON)
    teacher_px = np.rint(batch.x_views * 128.0 + 127.5).astype(np.uint8)  # exact inverse of (x - 127.5) / 128
    by_index = {int(total.index[i]): slot for slot, i in enumerate(batch.keep)}
    stored = {}
    for name in shards.names:
        t = pq.read_table(glint_views / "shards" / name, columns=["index", "embedding_views"]).to_pydict()
        stored.update(zip(t["index"], t["embedding_views"]))

    # The student's side: the training input pipeline, unscaled.
    plan = plan_epoch(shards.rows, seed=0, epoch=0, world_size=1, rank=0, buffer=32, global_batch=8)
    checked = 0
    for b in make_dataset(shards, plan, seed=0, flip=True, replica_batch=8, view_prob=1.0):
        for j in range(8):
            idx, v = int(b["index"][j]), int(b["view"][j])
            assert v >= 0
            assert np.array_equal(b["image"][j].numpy(), teacher_px[v, by_index[idx]]), (idx, v)
            np.testing.assert_array_equal(b["target"][j].numpy(), np.asarray(stored[idx][v], np.float32))
            checked += 1
    assert checked == plan.remaining
    # And the stored target is the teacher on those pixels (to float noise of another batch shape).
    out = worker.teacher.embed(batch.x_views[1, :8])
    want = np.stack([np.asarray(stored[int(total.index[batch.keep[s]])][1], np.float32) for s in range(8)])
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


def _train(shards: Path, out: Path, *extra):
    return run_cli("train", shards, "--out", out, "--epochs", 6, "--batch-size", 16, "--student", "mobilenetv2", "--width", 0.35, "--lr", 5e-3,
                   "--warmup-steps", 5, "--val-split", 0.34, "--val-images", 40, "--shuffle-buffer", 64,
                   "--checkpoint-every", 1000, "--log-every", 1, "--trace-samples", "--no-progress", *extra)


def _planned(shards: Path) -> list[tuple[int, int, list[int]]]:
    """(step, epoch, listing indices) of every step of ``_train``'s run as one process plans it:
    the held-out people's rows excluded, the rest in each epoch's planned order."""
    import pyarrow.parquet as pq

    from distill.shards.reader import open_shards
    from distill.train.centres import scan_shards
    from distill.train.config import TrainConfig
    from distill.train.order import plan_epoch
    from distill.train.validate import heldout_classes

    opened, defaults = open_shards(str(shards)), TrainConfig(shards=str(shards), out="-")
    scan = scan_shards(opened, centres=False)
    exclude = np.isin(scan.labels, heldout_classes(scan.counts, 0.34, defaults.val_seed))
    index_of = np.concatenate([pq.read_table(shards / n, columns=["index"]).column("index").to_numpy()
                               for n in opened.names])
    steps = []
    for epoch in range(6):
        plan = plan_epoch(opened.rows, seed=defaults.seed, epoch=epoch, world_size=1, rank=0, buffer=64, global_batch=16,
                          partitions=defaults.partitions, exclude=exclude)
        for batch in index_of[plan.order].reshape(plan.steps, 16).tolist():
            steps.append((len(steps) + 1, epoch, batch))
    return steps


def test_training_with_views_and_validation_learns_keeps_its_best_and_resumes(glint_views, tmp_path):
    shards = glint_views / "shards"
    run = tmp_path / "student"
    # Stopped mid-epoch (step 6 of 4-step epochs), then resumed with the same command.
    _train(shards, run, "--max-steps", 6)
    _train(shards, run)
    trace = [(r["step"], r["epoch"], r["index"]) for r in map(json.loads, (run / "trace.jsonl").read_text().splitlines())]
    assert trace == _planned(shards)  # the planned samples in the planned order, none twice, none skipped
    used = {i for _, _, idx in trace for i in idx}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_cos" in r]
    assert val[0]["kind"] == "val" and val[0]["step"] == 0 and len(val) == 7  # the start, then every epoch
    assert val[-1]["val_cos"] > val[0]["val_cos"] + 0.05, [round(r["val_cos"], 3) for r in val]
    best = json.loads((run / "best" / "val.json").read_text())
    assert best["val_auc"] == max(r["val_auc"] for r in val[1:])  # the best over both parts of the run

    import pyarrow.parquet as pq

    labels = {}
    for name in json.loads((shards / "manifest.json").read_text())["shards"]:
        t = pq.read_table(shards / name["name"], columns=["index", "label"]).to_pydict()
        labels.update(zip(t["index"], t["label"]))
    held = {lab for lab in labels.values()} - {labels[i] for i in used}
    assert len(held) == 2  # 0.34 of 6 people never trained on

    run_cli("export", run, "--out", tmp_path / "export", "--best")
    doc = json.loads((tmp_path / "export" / "export.json").read_text())
    assert doc["validation"]["val_auc"] == best["val_auc"]
    assert os.path.isfile(tmp_path / "export" / "checkpoint" / "state.npz")
    # An export is a starting point: --init takes it (by variable name).
    again = run_cli("train", shards, "--out", tmp_path / "again", "--init", tmp_path / "export", "--max-steps", 1,
                    "--batch-size", 16, "--student", "mobilenetv2", "--width", 0.35, "--no-progress")
    assert "initialised:" in again.stderr
