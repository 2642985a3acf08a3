from distill.embed.status import format_status, summarize
from distill.shards.format import RowError, ShardRecord
from distill.shards.ledger import Lease, LedgerState

MANIFEST = {"run_id": "abc", "rows": 100, "shard_size": 25, "num_classes": 4, "embedding_dim": 8, "flip": True, "dtype": "float32"}


def test_summary_counts_rates_and_eta():
    done = {
        0: ShardRecord(0, 24, 1, "x", (RowError(3, "/a.jpg", "missing file"),), seconds=10.0, finished_at=1000.0),
        1: ShardRecord(1, 25, 1, "y", seconds=10.0, finished_at=1010.0),
    }
    state = LedgerState(4, {2: Lease(2, "h:1:driver:a", 1050.0), 3: Lease(3, "h:1:driver:a", 900.0)}, done)
    s = summarize(MANIFEST, state, now=1020.0)
    assert (s["shards_done"], s["shards_leased"], s["shards_pending"]) == (2, 1, 1)
    assert (s["rows_done"], s["errors"], s["pending_rows"]) == (49, 1, 50)
    assert s["images_per_second_overall"] == 50 / 20
    assert s["eta_seconds"] > 0 and not s["complete"]
    assert [lease["shard"] for lease in s["leases"]] == ["part-00002.parquet"]
    text = format_status(s, MANIFEST, [{"index": 3, "path": "/a.jpg", "reason": "missing file"}])
    assert "2 done, 1 leased, 1 pending of 4" in text and "missing file" in text


def test_empty_and_complete():
    s = summarize(MANIFEST, LedgerState(4), now=0.0)
    assert s["shards_pending"] == 4 and s["eta_seconds"] is None and s["images_per_second_overall"] is None
    done = {k: ShardRecord(k, 25, 1, "z", seconds=1.0, finished_at=10.0 + k) for k in range(4)}
    s = summarize(MANIFEST, LedgerState(4, {}, done), now=20.0)
    assert s["complete"] and s["eta_seconds"] is None
