"""RedisLedger against a real redis-server: transitions, expiry, races between processes,
agreement with the pure ``pick_shards``, passwords, restarts and flushes mid-run."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from redis.backoff import NoBackoff
from redis.retry import Retry

from distill.errors import DistillError
from distill.shards.format import ShardRecord, encode_shard, shard_schema, verify_shard
from distill.shards.ledger import Lease, open_ledger, pick_shards
from distill.shards.ledger_redis import LedgerUnreachable, RedisLedger
from distill.shards.plan import num_shards as plan_num_shards
from distill.shards.plan import shard_at, shard_name
from distill.shards.reconcile import records_from_files
from distill.storage import LocalStorage

# tests/ holds shared helpers beside conftest.py; put it on the path however pytest imports us.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from redis_server import RedisServer  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as rs:
        yield rs.url


def new_run() -> str:
    return uuid.uuid4().hex[:16]


def rec(k: int, rows: int = 4) -> ShardRecord:
    return ShardRecord(k=k, rows=rows, bytes=100 + k, sha256=f"{k:064x}")


# ---------------------------------------------------------------- transitions

def test_transitions_follow_the_protocol(redis_url):
    led = RedisLedger.from_url(redis_url, run_id=new_run(), num_shards=8)
    assert led.acquire("a", 3, ttl=60, now=0) == [0, 1, 2]
    assert led.acquire("b", 2, ttl=60, now=0) == [3, 4]
    # renew keeps only the caller's own leases
    assert led.renew("a", [0, 1, 2, 3], ttl=60, now=0) == [0, 1, 2]
    led.release("b", [0])  # not b's: ignored
    led.release("a", [1])
    assert led.acquire("c", 2, ttl=60, now=0) == [1, 5]
    # complete is idempotent and accepted from any owner; the first record stands
    led.complete("b", rec(0))
    led.complete("c", ShardRecord(k=0, rows=4, bytes=1, sha256="other"))
    assert led.renew("a", [0, 2], ttl=60, now=0) == [2]  # done shards are no longer held
    state = led.snapshot()
    assert state.done == {0: rec(0)}
    assert sorted(state.leases) == [1, 2, 3, 4, 5]
    assert state.counts(time.time()) == {"done": 1, "leased": 5, "pending": 2}
    # forget makes a done shard pending again, lowest first
    led.forget([0])
    assert led.acquire("d", 5, ttl=60, now=0) == [0, 6, 7]
    assert led.acquire("d", 5, ttl=60, now=0) == []
    led.close()


def test_rebuild_replaces_done_set_and_drops_leases(redis_url):
    led = RedisLedger.from_url(redis_url, run_id=new_run(), num_shards=6)
    led.acquire("a", 6, ttl=60, now=0)
    led.complete("a", rec(5))
    led.rebuild([rec(0), rec(2)])
    state = led.snapshot()
    assert sorted(state.done) == [0, 2] and state.leases == {}
    assert led.acquire("b", 10, ttl=60, now=0) == [1, 3, 4, 5]
    with pytest.raises(ValueError, match="outside"):
        led.rebuild([rec(6)])


def test_runs_sharing_one_redis_are_separate(redis_url):
    a = RedisLedger.from_url(redis_url, run_id=new_run(), num_shards=3)
    b = RedisLedger.from_url(redis_url, run_id=new_run(), num_shards=3)
    assert a.acquire("x", 3, ttl=60, now=0) == [0, 1, 2]
    assert b.acquire("x", 3, ttl=60, now=0) == [0, 1, 2]
    a.complete("x", rec(1))
    assert b.snapshot().done == {}


def test_shard_count_mismatch_is_refused(redis_url):
    run = new_run()
    RedisLedger.from_url(redis_url, run_id=run, num_shards=4)
    with pytest.raises(ValueError, match="4 shards, not 5"):
        RedisLedger.from_url(redis_url, run_id=run, num_shards=5)


def test_open_ledger_dispatches_redis_urls(redis_url, tmp_path):
    led = open_ledger(redis_url, str(tmp_path), 2, new_run())
    assert isinstance(led, RedisLedger)
    assert led.acquire("a", 5, ttl=60, now=0) == [0, 1]


# ---------------------------------------------------------------- expiry and clocks

def test_expired_lease_returns_to_pending(redis_url):
    led = RedisLedger.from_url(redis_url, run_id=new_run(), num_shards=3)
    assert led.acquire("a", 2, ttl=0.3, now=0) == [0, 1]
    assert led.acquire("b", 3, ttl=60, now=0) == [2]
    while any(lease.expires > time.time() for k, lease in led.snapshot().leases.items() if k in (0, 1)):
        time.sleep(0.01)  # until Redis's own clock has expired them (snapshot() puts it on ours)
    assert led.renew("a", [0, 1], ttl=60, now=0) == []  # expired: no longer a's
    assert led.acquire("b", 3, ttl=60, now=0) == [0, 1]
    assert led.renew("b", [0, 1, 2], ttl=60, now=0) == [0, 1, 2]


def test_callers_clock_is_ignored(redis_url):
    led = RedisLedger.from_url(redis_url, run_id=new_run(), num_shards=2)
    # A driver whose clock is a day ahead must not expire everybody else's leases.
    assert led.acquire("a", 1, ttl=60, now=time.time()) == [0]
    assert led.acquire("b", 2, ttl=60, now=time.time() + 86400) == [1]


def test_snapshot_expiry_is_on_the_callers_clock(redis_url):
    led = RedisLedger.from_url(redis_url, run_id=new_run(), num_shards=1)
    before = time.time()
    led.acquire("a", 1, ttl=60, now=0)
    lease = led.snapshot().leases[0]
    # same host, so server and local clocks agree to well under the 60 s ttl
    assert before + 50 < lease.expires < time.time() + 70
    assert lease.owner == "a"


def test_dead_local_owner_leases_are_reclaimed_at_once(redis_url):
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead_owner = f"{socket.gethostname()}:{gone.pid}:driver:dead00"
    live_owner = f"{socket.gethostname()}:{os.getpid()}:driver:live00"
    led = RedisLedger.from_url(redis_url, run_id=new_run(), num_shards=4)
    assert led.acquire(live_owner, 1, ttl=600, now=0) == [0]
    assert led.acquire(dead_owner, 2, ttl=600, now=0) == [1, 2]
    # the dead process's leases need not wait 600 s; the live one's are kept
    assert led.acquire("other", 4, ttl=60, now=0) == [1, 2, 3]


# ---------------------------------------------------------------- agreement with pick_shards

def test_lua_acquire_agrees_with_pick_shards(redis_url):
    import redis

    rnd = random.Random(4)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    owners = ["h1:1:driver:aa", "h2:2:driver:bb", "h3:3:driver:cc"]
    for case in range(150):
        n_shards = rnd.randint(0, 40)
        led = RedisLedger.from_url(redis_url, run_id=f"prop{case}-{new_run()}", num_shards=n_shards)
        done = {k for k in range(n_shards) if rnd.random() < 0.4}
        led.rebuild([rec(k) for k in done])
        sec, usec = r.time()
        now_ms = sec * 1000 + usec // 1000
        leases = {}
        for k in range(n_shards):
            if rnd.random() < 0.4:
                # far from now either way, so the server's clock moving during the call is moot
                exp_ms = now_ms + rnd.choice([-1, 1]) * rnd.randint(5_000, 100_000)
                who = rnd.choice(owners)
                r.hset(led.keys["lease"], k, f"{exp_ms} {who}")
                leases[k] = (exp_ms, who)
        # any hint at or below the done prefix is valid
        prefix = next((k for k in range(n_shards) if k not in done), n_shards)
        r.set(led.keys["hint"], rnd.randint(0, prefix))
        owner = rnd.choice(owners + ["h4:4:driver:dd"])
        n = rnd.randint(0, 12)
        want = pick_shards(n_shards, done, {k: Lease(k, o, e / 1000) for k, (e, o) in leases.items()}, now_ms / 1000, n)
        got = led.acquire(owner, n, ttl=60, now=0)
        assert got == want, f"case {case}"
        hint = int(r.get(led.keys["hint"]) or 0)
        assert hint <= prefix
        led.close()


def test_acquire_scans_from_the_done_prefix(redis_url):
    led = RedisLedger.from_url(redis_url, run_id=new_run(), num_shards=6000)
    led.rebuild([rec(k) for k in range(5990)])
    assert led.acquire("a", 4, ttl=60, now=0) == [5990, 5991, 5992, 5993]
    assert int(led._r.get(led.keys["hint"])) == 5990
    for k in range(5990, 5994):
        led.complete("a", rec(k))
    assert led.acquire("a", 100, ttl=60, now=0) == list(range(5994, 6000))
    assert int(led._r.get(led.keys["hint"])) == 5994
    led.forget([3])
    assert led.acquire("b", 1, ttl=60, now=0) == [3]


# ---------------------------------------------------------------- races between processes

def _race_worker(url, run_id, num, owner, barrier, out):
    led = RedisLedger.from_url(url, run_id=run_id, num_shards=num)
    rnd = random.Random(owner)
    granted = []
    barrier.wait()
    while True:
        ks = led.acquire(owner, rnd.randint(1, 3), ttl=600, now=0)
        if not ks:
            break
        granted.extend(ks)
        for k in ks:
            if rnd.random() < 0.7:
                led.complete(owner, rec(k))
    out.put((owner, granted))


def test_sixteen_processes_never_share_a_shard(redis_url):
    ctx = mp.get_context("fork")
    run, num, procs = new_run(), 300, 16
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_race_worker, args=(redis_url, run, num, f"w{i}", barrier, out)) for i in range(procs)]
    for w in workers:
        w.start()
    results = [out.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    granted = [k for _, ks in results for k in ks]
    assert len(granted) == len(set(granted)), "a shard was granted twice"
    assert sorted(granted) == list(range(num))
    assert sum(1 for _, ks in results if ks) > 1  # it was a race, not one process doing it all


# ---------------------------------------------------------------- passwords and unreachable servers

def test_password_auth_and_redaction(tmp_path):
    secret = "s3cret-" + uuid.uuid4().hex
    with RedisServer(tmp_path / "r", password=secret) as rs:
        led = RedisLedger.from_url(rs.url, run_id=new_run(), num_shards=2)
        assert led.acquire("a", 1, ttl=60, now=0) == [0]
        assert secret not in led.describe() and secret not in repr(led)
        assert f"127.0.0.1:{rs.port}/0" in led.describe()

        with pytest.raises(LedgerUnreachable) as e:
            RedisLedger.from_url(rs.url.replace(secret, "wrong-" + secret), run_id=new_run(), num_shards=2)
        assert "refused the password" in str(e.value) and secret not in str(e.value)
        assert f"127.0.0.1:{rs.port}" in str(e.value)

        with pytest.raises(LedgerUnreachable, match="requires a password"):
            RedisLedger.from_url(f"redis://127.0.0.1:{rs.port}/0", run_id=new_run(), num_shards=2)

        # Redis gone mid-run: the error names the redacted URL, never the password
        rs.stop()
        led._r.set_retry(Retry(NoBackoff(), 0))  # no need to wait out the ride-through retries
        with pytest.raises(ConnectionError) as e:
            led.acquire("a", 1, ttl=60, now=0)
        assert secret not in str(e.value) and "redis://:***@127.0.0.1" in str(e.value)


def test_password_from_rediscli_auth_keeps_it_out_of_the_url(tmp_path, monkeypatch):
    secret = "env-" + uuid.uuid4().hex
    with RedisServer(tmp_path / "r", password=secret) as rs:
        url = f"redis://127.0.0.1:{rs.port}/0"
        monkeypatch.setenv("REDISCLI_AUTH", secret)
        led = RedisLedger.from_url(url, run_id=new_run(), num_shards=1)
        assert led.acquire("a", 1, ttl=60, now=0) == [0]
        assert secret not in led.describe()
        bad = "bad-" + uuid.uuid4().hex
        monkeypatch.setenv("REDISCLI_AUTH", bad)
        with pytest.raises(LedgerUnreachable, match="refused the password") as e:
            RedisLedger.from_url(url, run_id=new_run(), num_shards=1)
        assert bad not in str(e.value)
        # a password in the URL wins over the environment
        assert RedisLedger.from_url(rs.url, run_id=new_run(), num_shards=1).acquire("a", 1, ttl=60, now=0) == [0]


def test_unreachable_redis_names_the_url_and_what_to_check():
    from redis_server import free_port

    url = f"redis://:hunter2@127.0.0.1:{free_port()}/3"  # nothing listens there
    with pytest.raises(LedgerUnreachable) as e:
        RedisLedger.from_url(url, run_id="r", num_shards=1)
    msg = str(e.value)
    assert isinstance(e.value, ConnectionError) and isinstance(e.value, DistillError)
    assert "hunter2" not in msg and "redis://:***@127.0.0.1" in msg
    assert "redis-server runs there" in msg


def test_bad_url_is_a_value_error():
    with pytest.raises(ValueError, match="not a valid Redis URL"):
        RedisLedger.from_url("redis://:pw@127.0.0.1:notaport/0", run_id="r", num_shards=1)


# ---------------------------------------------------------------- restarts and flushes mid-run

ROWS, SHARD_SIZE = 90, 4  # 23 shards, the last one short


def write_shard(storage, run_id: str, k: int) -> ShardRecord:
    """What a driver does for shard k: durable file first, then the record for the ledger."""
    s = shard_at(k, ROWS, SHARD_SIZE)
    idx = np.arange(s.start, s.stop)
    data = encode_shard(
        shard_schema(4, flip=False, images=False, paths=False),
        index=idx, label=idx % 7, embedding=np.outer(idx, np.ones(4)).astype(np.float32),
        run_id=run_id, k=k, start=s.start, stop=s.stop,
    )
    storage.write_atomic(shard_name(k), data)
    return verify_shard(storage, shard_name(k), run_id, k)


def drive(led, storage, run_id: str, owner: str, pause: float = 0.0) -> list[int]:
    """A driver's loop without the teacher: lease, write, complete, until nothing is left."""
    written = []
    while ks := led.acquire(owner, 2, ttl=30, now=time.time()):
        for k in ks:
            led.complete(owner, write_shard(storage, run_id, k))
            written.append(k)
            time.sleep(pause)
    return written


def assert_exactly_once(storage, led):
    n = plan_num_shards(ROWS, SHARD_SIZE)
    assert sorted(led.snapshot().done) == list(range(n))
    idx = np.concatenate([pq.read_table(storage.uri(shard_name(k)), columns=["index"])["index"].to_numpy()
                          for k in range(n)])
    assert sorted(idx.tolist()) == list(range(ROWS))


def test_redis_killed_and_restarted_mid_run_keeps_done_and_leases(tmp_path):
    n, run = plan_num_shards(ROWS, SHARD_SIZE), new_run()
    storage = LocalStorage(str(tmp_path / "shards"))
    with RedisServer(tmp_path / "redis", appendonly=True) as rs:
        a = RedisLedger.from_url(rs.url, run_id=run, num_shards=n)
        assert a.acquire("a", 4, ttl=60, now=0) == [0, 1, 2, 3]
        for k in (0, 1):
            a.complete("a", write_shard(storage, run, k))
        rs.restart(kill=True)  # SIGKILL: only the append-only file keeps the state
        # the same client rides through the restart (new connection, script cache reloaded)
        a.complete("a", write_shard(storage, run, 2))
        assert a.renew("a", [3], ttl=60, now=0) == [3]
        b = RedisLedger.from_url(rs.url, run_id=run, num_shards=n)
        assert sorted(b.snapshot().done) == [0, 1, 2]
        assert b.acquire("b", 1, ttl=60, now=0) == [4]  # a's lease on 3 survived too
        b.complete("b", write_shard(storage, run, 4))
        a.complete("a", write_shard(storage, run, 3))
        drive(a, storage, run, "a")
        assert_exactly_once(storage, b)


def test_drivers_ride_through_redis_restarts(tmp_path):
    n, run = plan_num_shards(ROWS, SHARD_SIZE), new_run()
    storage = LocalStorage(str(tmp_path / "shards"))
    with RedisServer(tmp_path / "redis", appendonly=True) as rs:
        leds = [RedisLedger.from_url(rs.url, run_id=run, num_shards=n) for _ in range(2)]
        errors, written = [], []

        def worker(i):
            try:
                written.extend(drive(leds[i], storage, run, f"d{i}", pause=0.03))
            except Exception as e:  # surfaced by the assertion below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        watcher, seen = rs.client(), []
        for at in (4, 12):  # restart twice while the drivers work
            while watcher.hlen(leds[0].keys["done"]) < at:
                time.sleep(0.005)
            seen.append(watcher.hlen(leds[0].keys["done"]))
            rs.restart(kill=True)
            watcher = rs.client()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert max(seen) < n, "the run finished before the restarts: not a mid-run test"
        assert sorted(written) == list(range(n)), "a shard was written twice or never"
        assert_exactly_once(storage, leds[0])


def test_flushed_redis_is_rebuilt_from_the_shard_files(tmp_path):
    n, run = plan_num_shards(ROWS, SHARD_SIZE), new_run()
    storage = LocalStorage(str(tmp_path / "shards"))
    with RedisServer(tmp_path / "redis") as rs:
        a = RedisLedger.from_url(rs.url, run_id=run, num_shards=n)
        assert a.acquire("a", 12, ttl=60, now=0) == list(range(12))
        for k in range(10):
            a.complete("a", write_shard(storage, run, k))
        write_shard(storage, run, 10)  # a driver killed between rename and complete
        storage.write_atomic(shard_name(11), b"torn")  # and a file that is not a shard
        before = {k: os.stat(storage.uri(shard_name(k))).st_mtime_ns for k in range(11)}

        rs.flush()
        b = RedisLedger.from_url(rs.url, run_id=run, num_shards=n)
        assert b.snapshot().done == {}
        b.rebuild(records_from_files(storage, run, n))
        assert sorted(b.snapshot().done) == list(range(11))
        assert drive(b, storage, run, "b") == list(range(11, n))  # only what has no valid file
        assert {k: os.stat(storage.uri(shard_name(k))).st_mtime_ns for k in range(11)} == before
        assert_exactly_once(storage, b)
