"""Shard files against their records (distill.shards.verify): missing, resized, bit-rotted;
and the cache that lets a resume skip files it verified, only while they are untouched."""

from __future__ import annotations

import hashlib
import os

from distill.shards.verify import Expected, check
from distill.storage import LocalStorage


def _files(tmp_path):
    storage = LocalStorage(str(tmp_path))
    expected = []
    for i in range(3):
        data = bytes(range(256)) * (40 + i)
        storage.write_atomic(f"part-{i:05d}.parquet", data)
        expected.append(Expected(f"part-{i:05d}.parquet", len(data), hashlib.sha256(data).hexdigest()))
    return storage, expected


def _rot(path, at: int = 100, n: int = 64) -> None:
    """Zero n bytes in the middle of a file, keeping its size and its mtime (a silent bad copy)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"\0" * n)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_missing_resized_and_rotted_files_are_named(tmp_path):
    storage, expected = _files(tmp_path)
    bad, verified = check(storage, expected, checksum=True)
    assert bad == [] and sorted(verified) == [e.name for e in expected]
    _rot(tmp_path / "part-00001.parquet")
    with open(tmp_path / "part-00002.parquet", "ab") as f:
        f.write(b"x")
    os.remove(tmp_path / "part-00000.parquet")
    bad, _ = check(storage, expected, checksum=True)
    assert [(m.name, m.why) for m in bad] == [
        ("part-00000.parquet", "missing"),
        ("part-00001.parquet", "sha256 differs from the record"),
        ("part-00002.parquet", f"{expected[2].bytes + 1:,} bytes, the record says {expected[2].bytes:,}"),
    ]
    assert [m.name for m in check(storage, expected, checksum=False)[0]] == ["part-00000.parquet", "part-00002.parquet"]


def test_the_cache_skips_only_files_untouched_since_they_were_verified(tmp_path):
    storage, expected = _files(tmp_path)
    _, cache = check(storage, expected, checksum=True)
    _rot(tmp_path / "part-00001.parquet")  # same size and mtime: the cache cannot tell, by design
    assert check(storage, expected, checksum=True, cache=cache)[0] == []
    os.utime(tmp_path / "part-00001.parquet")  # touched (a copy, a restore): read again
    assert [m.name for m in check(storage, expected, checksum=True, cache=cache)[0]] == ["part-00001.parquet"]
    assert [m.name for m in check(storage, expected, checksum=True)[0]] == ["part-00001.parquet"]
