import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from distill.shards.format import RowError, ShardRecord, encode_shard, read_footer, sha256, shard_schema, verify_shard
from distill.shards.manifest import (
    IncompatibleRun,
    build_manifest,
    check_compatible,
    read_manifest,
    run_id,
    write_manifest,
)
from distill.shards.reconcile import plan_reconcile, records_from_files
from distill.storage import open_storage, redact

IDENTITY = {
    "listing": "/x/listing.parquet", "listing_fingerprint": "aa", "rows": 10, "num_classes": 3, "label_names": None,
    "teacher": "/t", "teacher_fingerprint": "bb", "teacher_signature": {}, "input_size": [112, 112],
    "preprocessing": {"pixel_mean": 127.5, "pixel_scale": 128.0, "channel_order": "RGB"}, "embedding_dim": 4,
    "dtype": "float32", "flip": True, "images": True, "shard_size": 4, "batch_size": 2,
}


def make_shard(k=0, rows=3, dtype="float32", flip=True, images=True, run="r1", errors=()):
    schema = shard_schema(4, dtype, flip, images, paths=True)
    rng = np.random.default_rng(k)
    return encode_shard(
        schema, index=np.arange(rows) + 4 * k, label=np.arange(rows) % 3, path=[f"/img/{i}.jpg" for i in range(rows)],
        embedding=rng.normal(size=(rows, 4)), embedding_flip=rng.normal(size=(rows, 4)) if flip else None,
        image=[b"\xff\xd8jpeg"] * rows if images else None, run_id=run, k=k, start=4 * k, stop=4 * k + 4, errors=errors,
    )


def test_shard_is_plain_parquet_and_deterministic():
    a, b = make_shard(), make_shard()
    assert a == b  # no clocks or hostnames in the bytes
    t = pq.read_table(io.BytesIO(a))
    assert t.column_names == ["index", "label", "path", "embedding", "embedding_flip", "image"]
    typ = t.schema.field("embedding").type
    assert (typ.list_size, str(typ.value_type)) == (4, "float")
    assert t.to_pandas().shape == (3, 6)


@pytest.mark.parametrize("flip,images,dtype", [(False, False, "float16"), (True, False, "float32"), (False, True, "float32")])
def test_optional_columns(flip, images, dtype):
    t = pq.read_table(io.BytesIO(make_shard(flip=flip, images=images, dtype=dtype)))
    assert ("embedding_flip" in t.column_names) == flip and ("image" in t.column_names) == images
    assert t.schema.field("embedding").type.value_type.bit_width == (16 if dtype == "float16" else 32)


def test_footer_and_verify(tmp_path):
    st = open_storage(str(tmp_path))
    data = make_shard(k=1, errors=[RowError(6, "/img/6.jpg", "truncated image")])
    st.write_atomic("part-00001.parquet", data)
    f = read_footer(st, "part-00001.parquet")
    assert (f["run"], f["k"], f["start"], f["stop"], f["rows"]) == ("r1", 1, 4, 8, 3)
    assert f["errors"] == (RowError(6, "/img/6.jpg", "truncated image"),)
    r = verify_shard(st, "part-00001.parquet", "r1", 1)
    assert (r.rows, r.bytes, r.sha256) == (3, len(data), sha256(data))
    with pytest.raises(ValueError, match="another run"):
        verify_shard(st, "part-00001.parquet", "r2", 1)


def test_records_from_files_skips_and_removes_corrupt(tmp_path):
    st = open_storage(str(tmp_path))
    st.write_atomic("part-00000.parquet", make_shard(0))
    st.write_atomic("part-00001.parquet", make_shard(1)[:50])  # torn file: not a shard
    st.write_atomic("part-00007.parquet", make_shard(7))  # outside a 2-shard plan
    recs = records_from_files(st, "r1", 2)
    assert [r.k for r in recs] == [0]
    assert not st.exists("part-00001.parquet")


def test_plan_reconcile():
    forget, adopt = plan_reconcile({0: 10, 1: 20, 2: 30}, {0: 10, 1: 21, 3: 5, 9: 1}, 5)
    assert forget == [1, 2] and adopt == [3]


def test_manifest_identity_and_compatibility(tmp_path):
    recs = [ShardRecord(1, 4, 50, "s1", (RowError(5, "p", "missing file"),), seconds=9.0, finished_at=123.0),
            ShardRecord(0, 4, 40, "s0")]
    m = build_manifest(IDENTITY, recs, 3)
    assert [s["k"] for s in m["shards"]] == [0, 1] and m["shards"][1]["start"] == 4
    assert m["rows_done"] == 8 and m["error_count"] == 1 and not m["complete"]
    assert "seconds" not in json.dumps(m["shards"])  # no clocks: resumed == uninterrupted
    st = open_storage(str(tmp_path))
    write_manifest(st, m)
    assert read_manifest(st) == m
    assert m["run_id"] == run_id(IDENTITY)
    check_compatible(m, IDENTITY, "here")
    with pytest.raises(IncompatibleRun, match="(?s)teacher_fingerprint.*new --out"):
        check_compatible(m, {**IDENTITY, "teacher_fingerprint": "cc"}, "here")
    with pytest.raises(IncompatibleRun, match="preprocessing"):
        check_compatible(m, {**IDENTITY, "preprocessing": {**IDENTITY["preprocessing"], "channel_order": "BGR"}}, "d")


def test_redact_hides_passwords_only():
    assert redact("redis://:s3cret@10.0.0.1:6379/0") == "redis://:***@10.0.0.1:6379/0"
    assert redact("redis://user:s3cret@h:1/2") == "redis://user:***@h:1/2"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"
    assert "s3cret" not in redact("rediss://:s3cret@h")


def test_views_column_round_trips_as_plain_parquet():
    rng = np.random.default_rng(5)
    views = rng.normal(size=(3, 2, 4)).astype(np.float32)
    data = encode_shard(shard_schema(4, views=2), index=np.arange(3), label=np.zeros(3), path=["a", "b", "c"],
                        embedding=rng.normal(size=(3, 4)), embedding_flip=rng.normal(size=(3, 4)),
                        embedding_views=views, image=[b"x"] * 3, run_id="r", k=0, start=0, stop=3)
    t = pq.read_table(io.BytesIO(data))
    assert np.array_equal(np.array(t.column("embedding_views").to_pylist(), np.float32), views)
    assert t.to_pandas()["embedding_views"].shape == (3,)
    with pytest.raises(ValueError, match="embedding_views"):
        encode_shard(shard_schema(4, views=2), index=np.arange(3), label=np.zeros(3), path=None,
                     embedding=views[:, 0], embedding_flip=views[:, 0], embedding_views=views[:, :1],
                     image=[b"x"] * 3, run_id="r", k=0, start=0, stop=3)


def test_teacher_norms_are_recorded_per_shard_and_summed_in_the_manifest(tmp_path):
    from distill.shards.format import NormStats, summarise_norms

    storage = open_storage(str(tmp_path))
    storage.write_atomic("part-00000.parquet", make_shard(0))
    rec = verify_shard(storage, "part-00000.parquet", "r1", 0)
    emb = np.random.default_rng(0).normal(size=(3, 4))
    norms = np.linalg.norm(emb, axis=1)
    assert rec.norm.count == 3 and rec.norm.max == pytest.approx(norms.max()) and rec.norm.sum == pytest.approx(norms.sum())
    assert ShardRecord.from_json(json.loads(json.dumps(rec.to_json()))) == rec  # through a ledger and back
    both = summarise_norms([NormStats.of(emb[:2]), NormStats.of(emb[2:])])
    assert both["rows"] == 3 and both["mean"] == pytest.approx(norms.mean(), abs=1e-4)
    assert both["std"] == pytest.approx(norms.std(), abs=1e-4) and both["min"] == pytest.approx(norms.min(), abs=1e-4)
    assert NormStats.of(np.zeros((0, 4), np.float32)).count == 0  # a shard of unreadable rows only
    m = build_manifest(IDENTITY, [rec], 3)
    assert m["teacher_norm"]["rows"] == 3
    assert build_manifest(IDENTITY, [ShardRecord(0, 3, 1, "x")], 3)["teacher_norm"] is None  # an old record


def test_runs_without_views_keep_their_id():
    # The id before views existed, computed the way it was: adding the field must not orphan old shard dirs.
    import hashlib

    old_fields = [f for f in ("listing_fingerprint", "rows", "num_classes", "teacher_fingerprint", "input_size",
                              "preprocessing", "embedding_dim", "dtype", "flip", "images", "shard_size", "batch_size")]
    canon = json.dumps({k: IDENTITY[k] for k in old_fields}, sort_keys=True, separators=(",", ":"))
    assert run_id({**IDENTITY, "views": None}) == hashlib.sha256(canon.encode()).hexdigest()[:16]
    assert run_id({**IDENTITY, "views": {"count": 2}}) != run_id(IDENTITY)
    with pytest.raises(IncompatibleRun, match="views"):
        check_compatible(IDENTITY, {**IDENTITY, "views": {"count": 2}}, "d")
