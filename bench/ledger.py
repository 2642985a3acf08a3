"""Ledger operations/s with 64 concurrent simulated workers over emore's 5,687 shards.

Each worker is its own process (drivers are processes) looping acquire(1) -> renew ->
complete as fast as it can, until every shard is done: the whole ledger traffic of an emore
teacher pass with shards of 1024, pushed through as fast as the backend allows. Backends:
the file ledger (``_ledger/`` files under one flock, on local disk) and the Redis ledger
against a real ``redis-server`` on loopback, without persistence and with ``appendonly yes,
appendfsync always`` (every write on disk before the reply). Rates are also given for the
first and the last 10% of the shards (the file ledger scans its directory on every call,
and the directory fills up).

    python bench/ledger.py
    python bench/ledger.py --workers 16 --shards 1000 --backends file,redis
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/NAME.py` from anywhere

from bench.common import add_idle_args, loadavg, print_header, settle, table  # noqa: E402

EMORE_SHARDS = 5_687  # 5,822,653 rows / 1024
BACKENDS = ("file", "redis", "redis-aof")
TTL = 300.0


def _open(backend: str, where: str, num_shards: int, run_id: str):
    if backend == "file":
        from distill.shards.ledger import FileLedger

        return FileLedger(where, num_shards)
    from distill.shards.ledger_redis import RedisLedger

    return RedisLedger.from_url(where, run_id=run_id, num_shards=num_shards)


def _record(k: int):
    from distill.shards.format import ShardRecord

    return ShardRecord(k=k, rows=1024, bytes=10_500_000, sha256="0" * 64, seconds=1.0, finished_at=time.time())


def worker(backend: str, where: str, num_shards: int, run_id: str, ready, go, stop_at: mp.Value, out) -> None:
    """One simulated driver: lease one shard, renew it, complete it; repeat until time or work runs out."""
    from distill.shards.ledger import new_owner

    ledger = _open(backend, where, num_shards, run_id)
    owner = new_owner("bench")
    lat: dict[str, list[float]] = {"acquire": [], "renew": [], "complete": [], "done_at": []}
    ready.release()
    go.wait()
    end = stop_at.value
    while time.time() < end:
        t0 = time.perf_counter()
        ks = ledger.acquire(owner, 1, TTL, time.time())
        t1 = time.perf_counter()
        lat["acquire"].append(t1 - t0)
        if not ks:
            break
        ledger.renew(owner, ks, TTL, time.time())
        t2 = time.perf_counter()
        lat["renew"].append(t2 - t1)
        ledger.complete(owner, _record(ks[0]))
        lat["complete"].append(time.perf_counter() - t2)
        lat["done_at"].append(time.time())
    ledger.close()
    out.put((lat, time.time()))


def measure(backend: str, where: str, num_shards: int, workers: int, seconds: float, run_id: str) -> dict:
    """``workers`` processes push every shard through the ledger (or stop after ``seconds``)."""
    ledger = _open(backend, where, num_shards, run_id)
    ctx = mp.get_context("fork")  # nothing heavy is imported here: forking is safe and quick
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    stop_at = ctx.Value("d", 0.0)
    procs = [ctx.Process(target=worker, args=(backend, where, num_shards, run_id, ready, go, stop_at, out))
             for _ in range(workers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    t0 = time.time()
    stop_at.value = t0 + seconds
    go.set()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    end = max(t for _, t in results)
    lats = {k: [x for lat, _ in results for x in lat[k]] for k in ("acquire", "renew", "complete")}
    done_at = sorted(x for lat, _ in results for x in lat["done_at"])
    ops = sum(len(v) for v in lats.values())
    state = ledger.snapshot()
    server_us = None
    if backend != "file":
        # Redis's own CPU per ledger operation: what one server can sustain, whoever the clients are.
        stats = ledger._r.info("commandstats")
        server_us = sum(v["usec"] for v in stats.values()) / max(ops, 1)
    ledger.close()
    if len(state.done) != len(done_at):
        raise RuntimeError(f"{backend}: {len(done_at)} completes but {len(state.done)} done shards")

    def pct(xs: list[float], q: float) -> float:
        return 1000 * sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    def rate(lo: int, hi: int) -> float:
        """Shards/s between the lo-th and the hi-th completion."""
        return (hi - lo) / max(done_at[hi] - done_at[lo], 1e-9)

    tenth = max(1, len(done_at) // 10)
    return {
        "ops_per_s": ops / (end - t0), "shards_per_s": len(done_at) / (end - t0), "seconds": end - t0,
        "done": len(done_at), "first_tenth": rate(0, tenth), "last_tenth": rate(len(done_at) - 1 - tenth, len(done_at) - 1),
        "acquire_p50_ms": pct(lats["acquire"], 0.5), "acquire_p99_ms": pct(lats["acquire"], 0.99),
        "renew_p50_ms": pct(lats["renew"], 0.5), "complete_p50_ms": pct(lats["complete"], 0.5),
        "complete_p99_ms": pct(lats["complete"], 0.99), "server_us_per_op": server_us,
    }


def run_backend(backend: str, work: Path, a) -> dict:
    run_id = "benchledger00000"
    if backend == "file":
        where = work / "file"
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        return measure(backend, str(where), a.shards, a.workers, a.seconds, run_id)
    # The test suite's real redis-server helper: free port, own dir, optional AOF.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from redis_server import RedisServer

    shutil.rmtree(work / backend, ignore_errors=True)  # an AOF left by an earlier run would be replayed
    with RedisServer(work / backend, appendonly=backend == "redis-aof") as rs:
        return measure("redis", rs.url, a.shards, a.workers, a.seconds, run_id)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--shards", type=int, default=EMORE_SHARDS)
    p.add_argument("--seconds", type=float, default=240.0, help="stop a backend after this long even if shards are left")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--work", default=None)
    add_idle_args(p)
    a = p.parse_args(argv)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    work.mkdir(parents=True, exist_ok=True)
    print_header("Ledger operations/s")
    print(f"{a.workers} worker processes, {a.shards:,} shards; each cycle = acquire(1) + renew + complete = 3 ops; "
          "ledger dir and AOF on local disk\n")
    rows = []
    for backend in a.backends.split(","):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")
        load = settle(a, f"the {backend} ledger").label()
        r = run_backend(backend, work, a)
        print(f"  {backend}: {r['ops_per_s']:.0f} ops/s, {r['done']} shards in {r['seconds']:.1f} s",
              file=sys.stderr, flush=True)
        rows.append([backend, f"{r['done']:,} in {r['seconds']:.1f} s", f"{r['ops_per_s']:,.0f}",
                     f"{r['shards_per_s']:,.0f}", f"{r['first_tenth']:,.0f} / {r['last_tenth']:,.0f}",
                     f"{r['acquire_p50_ms']:.1f} / {r['acquire_p99_ms']:.1f}", f"{r['renew_p50_ms']:.1f}",
                     f"{r['complete_p50_ms']:.1f} / {r['complete_p99_ms']:.1f}",
                     "-" if r["server_us_per_op"] is None else
                     f"{r['server_us_per_op']:.0f} µs ({1e6 / r['server_us_per_op']:,.0f} ops/s)", load])
    print(table(["ledger", "shards done", "ops/s", "shards/s", "shards/s first / last 10%", "acquire p50 / p99 ms",
                 "renew p50 ms", "complete p50 / p99 ms", "Redis server CPU per op (one core's capacity)",
                 "load avg at start"], rows))
    print(f"\nload average at the end: {loadavg()}")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
