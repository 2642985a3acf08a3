"""Both storage backends honour the same contract: whole objects under final names only."""

import os

import pyarrow.fs as pafs
import pytest
from test_manifest_format import make_shard

from distill.errors import BadOption
from distill.shards.format import verify_shard
from distill.shards.reconcile import records_from_files
from distill.storage import ArrowStorage, LocalStorage, is_temp_name, local_path, open_storage


@pytest.fixture(params=["local", "arrow"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "out"))
    # The object-store code path (write-once keys via pyarrow.fs), on a local filesystem.
    fs = pafs.LocalFileSystem()
    fs.create_dir(str(tmp_path / "out"))
    return ArrowStorage(fs, str(tmp_path / "out"), "file")


def test_contract(storage):
    data = make_shard(0)
    storage.write_atomic("part-00000.parquet", data)
    storage.write_atomic("manifest.json", b"{}")
    assert storage.list() == ["manifest.json", "part-00000.parquet"]  # no temp leftovers
    assert storage.exists("part-00000.parquet") and not storage.exists("part-00001.parquet")
    assert storage.size("part-00000.parquet") == len(data) and storage.read_bytes("part-00000.parquet") == data
    with storage.open_input("part-00000.parquet") as f:
        assert f.read(4) == b"PAR1"
    assert verify_shard(storage, "part-00000.parquet", "r1", 0).rows == 3
    assert [r.k for r in records_from_files(storage, "r1", 1)] == [0]
    storage.remove("part-00000.parquet")
    storage.remove("part-00000.parquet")  # idempotent
    assert storage.list() == ["manifest.json"]


def test_local_write_failure_leaves_nothing(tmp_path):
    st = LocalStorage(str(tmp_path))
    with pytest.raises(TypeError):
        st.write_atomic("part-00000.parquet", object())  # not bytes: fails mid-write
    assert not [n for n in os.listdir(tmp_path) if is_temp_name(n) or n.startswith("part-")]


def test_uris_open_arrow_storage_and_bad_ones_explain(tmp_path):
    st = open_storage(f"file://{tmp_path}/x")
    assert isinstance(st, LocalStorage) and os.path.isdir(tmp_path / "x")
    with pytest.raises(ValueError, match="cannot open nosuch://"):
        open_storage("nosuch://bucket/dir")


def test_local_only_options_refuse_object_store_uris_instead_of_writing_a_local_s3_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadOption, match=r"--plot s3://bucket/roc.png: this option takes a local path only"):
        local_path("s3://bucket/roc.png", "--plot")
    with pytest.raises(BadOption, match=r"gs://b/x"):
        local_path("gs://b/x", "--checkpoint")
    assert local_path("run/student", "--out") == str(tmp_path / "run" / "student")
    assert local_path("file:///data/run", "--out") == "/data/run"
    assert not (tmp_path / "s3:").exists()
