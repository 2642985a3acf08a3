"""The shard reader against the shard writer: row order, columns, fixed-size lists; and
export-npy, which reads through it."""

from __future__ import annotations

import os

import numpy as np
import pytest
from toy_shards import toy_images, toy_teacher, write_toy_shards

from distill.embed.export_npy import ExportNpyConfig, run_export_npy
from distill.errors import BadInput
from distill.shards.reader import ShardReader, embeddings, open_shards, read_shard_set


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    # 700 rows in shards of 300: row groups of 256 inside each, so reads cross them.
    return open_shards(str(write_toy_shards(tmp_path_factory.mktemp("r") / "s", rows=700, shard_size=300, size=32,
                                            dim=8)))


def test_scan_streams_every_row_group_in_sample_order(toy):
    seen, calls = [], []
    for _, start, t in ShardReader(toy).scan(["index", "label"], progress=calls.append):
        assert t.num_rows <= 256 and start == len(seen)
        seen.extend(t.column("index").to_pylist())
    assert seen == list(range(700)) and len(calls) == 3  # the writer's rows, in order; a tick per shard


def test_read_rows_keeps_the_order_asked_and_only_the_columns_asked(toy):
    ids = np.array([699, 0, 301, 299, 300, 5, 512])
    t = ShardReader(toy).read_rows(ids, ["index", "embedding"])
    assert t.column_names == ["index", "embedding"]
    assert t.column("index").to_pylist() == ids.tolist()  # sample id = listing row for these shards
    imgs, _ = toy_images(700, 4, 32)
    np.testing.assert_array_equal(embeddings(t.column("embedding"), 8), toy_teacher(imgs, 8)[ids])
    with pytest.raises(ValueError, match="outside"):
        ShardReader(toy).read_rows(np.array([700]), ["index"])


def test_first_rows_and_range_reads(toy):
    r = ShardReader(toy)
    assert r.first(10, ["index"]).column("index").to_pylist() == list(range(10))
    assert r.first(5000, ["index"]).num_rows == 700  # fewer when the shards hold fewer
    with r.open(1) as f:
        assert f.read(250, 290, ["index"]).column("index").to_pylist() == list(range(550, 590))  # across row groups


def test_fixed_size_lists_of_views_decode_as_rows_views_dim():
    import pyarrow as pa

    values = np.arange(2 * 3 * 4, dtype=np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(pa.array(values), 4), 3)
    np.testing.assert_array_equal(embeddings(col, 4, views=3), values.reshape(2, 3, 4))
    half = pa.FixedSizeListArray.from_arrays(pa.array(values.astype(np.float16)), 4)
    got = embeddings(pa.chunked_array([half]), 4)
    assert got.dtype == np.float32 and got.shape == (6, 4)


def test_a_shard_that_does_not_match_its_manifest_is_refused(tmp_path):
    loc = write_toy_shards(tmp_path / "s", rows=64, shard_size=32)
    shards = open_shards(str(loc))
    other = write_toy_shards(tmp_path / "o", rows=40, shard_size=40)
    os.replace(other / "part-00000.parquet", loc / "part-00001.parquet")
    with pytest.raises(BadInput, match="has 40 rows but the manifest says 32"):
        ShardReader(shards).open(1)


def test_export_npy_refuses_an_unfinished_run_unless_partial(tmp_path):
    loc = str(write_toy_shards(tmp_path / "s", rows=96, shard_size=32, drop_shards=1))
    assert not read_shard_set(loc).complete
    with pytest.raises(BadInput, match="2 of 3 shards are done.*--partial"):
        run_export_npy(ExportNpyConfig(loc, str(tmp_path / "npy"), progress=False))
    r = run_export_npy(ExportNpyConfig(loc, str(tmp_path / "npy"), partial=True, progress=False))
    assert (r.rows, r.shards, r.of_shards) == (64, 2, 3)
    assert np.load(tmp_path / "npy" / "1_emb.npy").shape == (32, 8)
    assert (tmp_path / "npy" / "1_img.foo").read_text().splitlines()[0] == "rec:32"  # no paths stored: the index
