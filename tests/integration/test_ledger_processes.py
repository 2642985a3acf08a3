"""The file ledger between real processes: a dead driver's leases come back at once, and
eight processes racing for 200 shards never share one."""

import multiprocessing as mp

import pytest

from distill.shards.ledger import FileLedger, dead_local_owners, new_owner

pytestmark = pytest.mark.integration


def test_lease_of_a_dead_local_process_is_reclaimed_at_once(tmp_path):
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=int)
    p.start()
    p.join()
    dead = f"{new_owner().split(':')[0]}:{p.pid}:driver:x"
    me = new_owner()
    assert dead_local_owners([dead, me]) == frozenset({dead})
    led = FileLedger(str(tmp_path), 2)
    assert led.acquire(dead, 2, ttl=3600, now=0) == [0, 1]
    assert led.acquire(me, 2, ttl=3600, now=1) == [0, 1]


def _race(args):
    path, owner = args
    led = FileLedger(path, 200)
    got = []
    while True:
        ks = led.acquire(owner, 3, ttl=600, now=0)
        if not ks:
            return got
        got.extend(ks)


def test_concurrent_processes_never_share_a_shard(tmp_path):
    with mp.get_context("spawn").Pool(8) as pool:
        results = pool.map(_race, [(str(tmp_path), f"h:{i}:d:x") for i in range(8)])
    flat = [k for r in results for k in r]
    assert sorted(flat) == list(range(200))
