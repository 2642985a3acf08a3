"""Listing sources, listings and verification sets read from a real S3 API server on loopback
(moto_server) and from a local disk, side by side; the pure layout rules are tests/unit/test_store_sources.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from distill.embed.listing import ListingConfig, build_listing, read_listing_info

pytestmark = pytest.mark.integration


BUCKET = "sources"


@pytest.fixture(scope="module")
def s3(s3_session):
    s3_session.make_bucket(BUCKET)
    return s3_session


def _upload(s3, root: Path, prefix: str) -> None:
    for f in sorted(root.rglob("*")):
        if f.is_file():
            s3.client().put_object(Bucket=BUCKET, Key=f"{prefix}/{f.relative_to(root).as_posix()}", Body=f.read_bytes())


def _tree(root: Path, files: list[str]) -> Path:
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(f"image {rel}".encode())
    return root


def _rows(path) -> dict:
    return pq.read_table(path).to_pydict()


def test_folders_on_the_store_list_as_the_same_folders_on_disk(aws, tmp_path):
    ids = _tree(tmp_path / "ids", ["bob/b.jpg", "bob/a.jpg", "bob/.hidden.jpg", "bob/notes.txt", "bob/s2/c.jpg",
                                   "alice/10.png", "alice/9.png", "loose.jpg"])
    flat = _tree(tmp_path / "flat", ["b.jpg", "a.PNG", "README"])
    _upload(aws, ids, "ids")
    _upload(aws, flat, "flat")
    local = build_listing(ListingConfig((str(ids), str(flat)), str(tmp_path / "local.parquet")))
    remote = build_listing(ListingConfig((f"s3://{BUCKET}/ids", f"s3://{BUCKET}/flat/"), str(tmp_path / "s3.parquet")))
    assert [(p.kind, p.rows, p.num_classes, p.unlabelled) for p in remote.parts] == \
        [(p.kind, p.rows, p.num_classes, p.unlabelled) for p in local.parts] == [("folders", 5, 2, 0), ("flat", 2, 0, 2)]
    assert remote.label_names == ("alice", "bob") == local.label_names
    a, b = _rows(tmp_path / "local.parquet"), _rows(tmp_path / "s3.parquet")
    assert a["label"] == b["label"] == [0, 0, 1, 1, 1, -1, -1]
    assert [p.replace(f"{tmp_path}/", f"s3://{BUCKET}/") for p in a["path"]] == b["path"]


def test_a_list_on_the_store_reads_relative_paths_there_and_a_listing_is_written_to_the_store(aws, tmp_path):
    from distill.images import UnreadableImage, read_file
    from distill.mirror import local_file

    _upload(aws, _tree(tmp_path / "faces", ["x/1.jpg", "y/2.jpg"]), "faces")
    aws.client().put_object(Bucket=BUCKET, Key="lists/train.txt",
                            Body=f"../faces/x/1.jpg\t0\ns3://{BUCKET}/faces/y/2.jpg\t1\n../faces/gone.jpg\t1\n".encode())
    out = f"s3://{BUCKET}/run/listing.parquet"
    info = build_listing(ListingConfig((f"s3://{BUCKET}/lists/train.txt",), out))
    assert (info.kind, info.rows, info.num_classes) == ("list", 3, 2)
    assert f"{BUCKET}/run/listing.parquet" in {f"{BUCKET}/{k}" for k in aws.keys(BUCKET, "run/")}
    local = local_file(out, "LISTING")  # this machine's copy, fetched once
    assert read_listing_info(local) == info
    paths = _rows(local)["path"]
    assert paths == [f"s3://{BUCKET}/faces/x/1.jpg", f"s3://{BUCKET}/faces/y/2.jpg", f"s3://{BUCKET}/faces/gone.jpg"]
    stamp = os.stat(local).st_mtime_ns
    assert local_file(out, "LISTING") == local and os.stat(local).st_mtime_ns == stamp  # unchanged: not fetched again
    # The rows read from the store as the teacher actors read them; a missing one is a bad row.
    assert read_file(paths[0]) == b"image x/1.jpg"
    with pytest.raises(UnreadableImage, match="missing object"):
        read_file(paths[2])
    with pytest.raises(FileNotFoundError, match="no such object"):
        local_file(f"s3://{BUCKET}/run/nope.parquet", "LISTING")


def test_a_verification_bin_is_read_from_the_store(aws, tmp_path):
    import pickle

    from distill.heldout import load_bin

    blobs = [b"\xff\xd8 one", b"\xff\xd8 two"]
    aws.client().put_object(Bucket=BUCKET, Key="eval/tiny.bin", Body=pickle.dumps((blobs, [True])))
    got, same = load_bin(f"s3://{BUCKET}/eval/tiny.bin")
    assert got == blobs and np.asarray(same).tolist() == [True]
    with pytest.raises(FileNotFoundError, match="no such object"):
        load_bin(f"s3://{BUCKET}/eval/none.bin")
