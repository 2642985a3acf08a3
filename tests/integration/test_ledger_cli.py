"""``distill ledger rebuild|show`` on real shard files, with the file and the Redis ledger."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from distill.cli import main
from distill.embed.ledger_cli import rebuild_summary, show_lines
from distill.shards.format import ShardRecord, encode_shard, shard_schema, verify_shard
from distill.shards.ledger import FileLedger, Lease, LedgerState
from distill.shards.ledger_redis import RedisLedger
from distill.shards.manifest import build_manifest, run_id, write_manifest
from distill.shards.plan import num_shards, shard_at, shard_name
from distill.storage import LocalStorage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from redis_server import RedisServer  # noqa: E402

pytestmark = pytest.mark.integration

ROWS, SHARD_SIZE = 50, 8  # 7 shards
N = num_shards(ROWS, SHARD_SIZE)
IDENTITY = {
    "listing_fingerprint": "L" * 16, "rows": ROWS, "num_classes": 5, "teacher_fingerprint": "T" * 16,
    "input_size": 112, "preprocessing": {"scale": 1 / 128, "mean": 127.5, "channels": "RGB"},
    "embedding_dim": 4, "dtype": "float32", "flip": False, "images": False,
    "shard_size": SHARD_SIZE, "batch_size": 4,
}
RUN = run_id(IDENTITY)


def make_run(root: Path, done: list[int]) -> tuple[LocalStorage, str]:
    """A shard directory as an interrupted `distill embed` leaves it: some files, a manifest."""
    storage = LocalStorage(str(root))
    records = []
    for k in done:
        s = shard_at(k, ROWS, SHARD_SIZE)
        idx = np.arange(s.start, s.stop)
        storage.write_atomic(shard_name(k), encode_shard(
            shard_schema(4, flip=False, images=False, paths=False), index=idx, label=idx % 5,
            embedding=np.ones((len(idx), 4), np.float32), run_id=RUN, k=k, start=s.start, stop=s.stop))
        records.append(verify_shard(storage, shard_name(k), RUN, k))
    write_manifest(storage, build_manifest(IDENTITY, records, N))
    return storage, str(root)


def test_rebuild_file_ledger_from_files(tmp_path, capsys):
    storage, d = make_run(tmp_path / "shards", [0, 1, 2, 5])
    storage.write_atomic(shard_name(6), b"not parquet")  # torn or foreign bytes: redone
    FileLedger(d, N).complete("old", ShardRecord(k=3, rows=8, bytes=1, sha256="gone"))  # file lost
    assert main(["ledger", "rebuild", d]) == 0
    out = capsys.readouterr().out
    assert "4 of 7 shards done (32 rows" in out and "first: 3, 4, 6" in out
    assert sorted(FileLedger(d, N).snapshot().done) == [0, 1, 2, 5]
    assert not storage.exists(shard_name(6))


def test_rebuild_and_show_redis_ledger_never_print_the_password(tmp_path, capsys):
    secret = "pw-" + uuid.uuid4().hex
    _, d = make_run(tmp_path / "shards", list(range(N)))
    with RedisServer(tmp_path / "redis", password=secret, appendonly=True) as rs:
        rs.flush()  # a lost ledger
        assert main(["ledger", "rebuild", d, "--ledger", rs.url]) == 0
        assert main(["ledger", "show", d, "--ledger", rs.url]) == 0
        out = capsys.readouterr().out
        assert secret not in out
        assert "redis://:***@127.0.0.1" in out and "7 of 7 shards done" in out and "every shard has a valid file" in out
        assert "7 done, 0 leased, 0 pending of 7 shards" in out
        assert sorted(RedisLedger.from_url(rs.url, run_id=RUN, num_shards=N).snapshot().done) == list(range(N))


def test_rebuild_refuses_while_drivers_hold_leases(tmp_path, capsys):
    _, d = make_run(tmp_path / "shards", [0])
    FileLedger(d, N).acquire("host:1:driver:abc", 2, ttl=600, now=time.time())
    assert main(["ledger", "rebuild", d]) == 2
    assert "live leases held by host:1:driver:abc" in capsys.readouterr().err
    assert main(["ledger", "rebuild", d, "--force"]) == 0
    state = FileLedger(d, N).snapshot()
    assert sorted(state.done) == [0] and state.leases == {}


def test_unreachable_redis_is_a_clean_cli_error(tmp_path, capsys):
    from redis_server import free_port

    _, d = make_run(tmp_path / "shards", [0])
    assert main(["ledger", "show", d, "--ledger", f"redis://:topsecret@127.0.0.1:{free_port()}/0"]) == 2
    err = capsys.readouterr().err
    assert "topsecret" not in err and "Redis ledger at redis://:***@127.0.0.1" in err


def test_missing_manifest_says_what_to_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["ledger", "rebuild", str(tmp_path / "empty")]) == 2
    assert "distill embed" in capsys.readouterr().err


def test_reports_are_pure():
    recs = [ShardRecord(k=k, rows=8, bytes=1, sha256="x") for k in (0, 2)]
    assert rebuild_summary(recs, 3, "L").splitlines() == [
        "rebuilt L: 2 of 3 shards done (16 rows, 0 row errors)",
        "1 shards to do (first: 1); rerun the same `distill embed` command to finish them",
    ]
    state = LedgerState(3, {1: Lease(1, "o", 130.0), 2: Lease(2, "p", 50.0)}, {0: recs[0]})
    assert show_lines(state, now=100.0, where="L") == [
        "L: 1 done, 1 leased, 1 pending of 3 shards",
        "  shard      1  o  expires in 30s",
    ]
