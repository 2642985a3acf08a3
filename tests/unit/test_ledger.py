"""The file ledger and the pure lease decisions (no Ray, no sleeping, no processes: the races
between real processes are in tests/integration/test_ledger_processes.py)."""

import random

import pytest

from distill.shards.format import RowError, ShardRecord
from distill.shards.ledger import FileLedger, Lease, pick_shards


def rec(k, rows=10):
    return ShardRecord(k=k, rows=rows, bytes=100 + k, sha256=f"{k:064x}", errors=(RowError(k, "p", "bad"),))


def test_pick_lowest_first_skipping_done_and_live_leases():
    leases = {1: Lease(1, "a", 100.0), 3: Lease(3, "b", 50.0)}
    assert pick_shards(6, done={0}, leases=leases, now=60.0, n=3) == [2, 3, 4]  # 3 expired at 50
    assert pick_shards(6, done={0}, leases=leases, now=10.0, n=10) == [2, 4, 5]
    assert pick_shards(6, done={0}, leases=leases, now=10.0, n=10, dead_owners=frozenset({"a"})) == [1, 2, 4, 5]
    assert pick_shards(3, done={0, 1, 2}, leases={}, now=0.0, n=5) == []


@pytest.mark.parametrize("seed", range(20))
def test_pick_never_hands_out_done_or_live(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 50)
    done = {k for k in range(n) if rng.random() < 0.3}
    leases = {k: Lease(k, f"o{k % 3}", rng.uniform(0, 20)) for k in range(n) if rng.random() < 0.3}
    now = 10.0
    got = pick_shards(n, done, leases, now, n=rng.randint(1, n))
    assert not set(got) & done
    assert all(k not in leases or leases[k].expires <= now for k in got)
    assert got == sorted(got)


def test_state_transitions(tmp_path):
    led = FileLedger(str(tmp_path), 4)
    a, b = "host:1:driver:a", "host:2:driver:b"
    assert led.acquire(a, 2, ttl=30, now=0) == [0, 1]
    assert led.acquire(b, 5, ttl=30, now=1) == [2, 3]
    assert led.acquire(b, 5, ttl=30, now=2) == []
    assert led.renew(a, [0, 1, 2], ttl=30, now=10) == [0, 1]  # 2 is b's
    led.complete(a, rec(0))
    led.complete(b, rec(0))  # idempotent, any owner
    led.release(a, [1])
    s = led.snapshot()
    assert set(s.done) == {0} and s.done[0] == rec(0)
    assert set(s.leases) == {2, 3}
    assert s.counts(now=10) == {"done": 1, "leased": 2, "pending": 1}
    assert led.acquire(b, 5, ttl=30, now=11) == [1]
    # b's leases (renewed to 41) expire: a takes them over
    assert led.acquire(a, 5, ttl=30, now=42) == [1, 2, 3]
    led.forget([0])
    assert 0 not in led.snapshot().done


def test_rebuild_replaces_everything(tmp_path):
    led = FileLedger(str(tmp_path), 5)
    led.acquire("h:1:d:a", 3, 30, 0)
    led.complete("h:1:d:a", rec(0))
    led.rebuild([rec(2), rec(4)])
    s = led.snapshot()
    assert set(s.done) == {2, 4} and not s.leases
