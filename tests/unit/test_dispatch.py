"""The embed driver's dispatch rules (shards.dispatch), swept over random event orders.

A small world stands in for the ledger and the actors: it hands out the lowest pending shards
when the dispatcher wants some, and each step picks one thing that can happen next (an actor
loads or dies while loading, a shard reports rows, finishes, fails, its actor dies, another
driver takes a lease). Whatever the order, the invariants of the module docstring hold.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from distill.shards.dispatch import ActorsKeepDying, Dispatcher, Forget, MarkDone, Release, Replace, Submit


class World:
    def __init__(self, n: int, workers: int, per_actor: int, max_attempts: int, seed: int):
        self.rng = random.Random(seed)
        self.n, self.max_attempts = n, max_attempts
        self.d = Dispatcher(workers, per_actor, max_attempts)
        self.pending = set(range(n))  # in the ledger, leasable
        self.done: set[int] = set()  # in the ledger, done (by us or by another driver)
        self.marked = Counter()  # MarkDone actions per shard: ours
        self.running: dict[int, int] = {}  # k -> slot, as the Submits said
        self.starting = set(range(workers))
        self.failures = Counter()  # failed attempts per shard
        self.deaths_while_running = 0

    def apply(self, actions) -> None:
        for a in actions:
            if isinstance(a, Submit):
                assert a.k not in self.running, f"shard {a.k} submitted while running"
                assert a.k not in self.done or a.k in self.d.held, "done shard submitted"
                assert a.slot not in self.starting, "submitted to an actor that is not ready"
                self.running[a.k] = a.slot
            elif isinstance(a, Forget):
                assert self.running.pop(a.k, None) is not None, f"forgot shard {a.k} that was not running"
            elif isinstance(a, Replace):
                assert all(s != a.slot for s in self.running.values()), "replaced an actor with shards on it"
                self.starting.add(a.slot)
            elif isinstance(a, MarkDone):
                self.marked[a.k] += 1
                self.done.add(a.k)
            elif isinstance(a, Release):
                for k in a.ks:
                    if k not in self.done:
                        self.pending.add(k)

    def lease(self) -> None:
        want = self.d.wants()
        if want:
            ks = sorted(self.pending)[:want]
            self.pending -= set(ks)
            self.apply(self.d.leased(ks))

    def check(self) -> None:
        # Never lost: every shard is done, held here, or leasable.
        for k in range(self.n):
            assert k in self.done or k in self.d.held or k in self.pending, f"shard {k} lost"
        assert not (set(self.running) - self.d.held - self.done), "running a shard not held"
        assert max(self.marked.values(), default=0) <= 1, "a shard marked done twice"
        assert all(v <= self.max_attempts for v in self.failures.values())

    def step(self, p_fail: float, p_die: float, p_lost: float) -> None:
        r = self.rng.random()
        if self.starting and (not self.running or r < 0.3):
            slot = self.rng.choice(sorted(self.starting))
            self.starting.discard(slot)
            if self.rng.random() < p_die:
                self.apply(self.d.start_failed(slot, "node died"))
            else:
                self.apply(self.d.ready(slot))
            return
        if self.d.held and self.rng.random() < p_lost:
            # Another driver takes a lease (k queued or running here) and finishes that shard.
            k = self.rng.choice(sorted(self.d.held))
            self.apply(self.d.lease_lost([k]))
            if k not in self.d.held:
                self.done.add(k)
            return
        if not self.running:
            return
        k = self.rng.choice(sorted(self.running))
        r = self.rng.random()
        if r < p_fail:
            self.failures[k] += 1
            self.apply(self.d.failed_attempt(k, "boom", actor_died=False))
        elif r < p_fail + p_die:
            slot = self.running[k]
            self.failures[k] += 1
            self.deaths_while_running += 1
            self.apply(self.d.failed_attempt(k, "actor died", actor_died=True))
            assert slot in self.starting
        elif r < 0.7:
            self.d.progress(k, 3)
        else:
            del self.running[k]
            self.apply(self.d.finished(k))

    def finished(self) -> bool:
        return not self.d.busy() and len(self.done) + len(self.d.failed) >= self.n


@pytest.mark.parametrize("seed", range(300))
def test_random_event_orders_keep_every_invariant(seed):
    rng = random.Random(seed)
    w = World(n=rng.randint(1, 30), workers=rng.randint(1, 4), per_actor=rng.randint(1, 3),
              max_attempts=rng.randint(1, 4), seed=seed)
    p_fail, p_die, p_lost = rng.choice([0, 0.05, 0.2]), rng.choice([0, 0.03, 0.1]), rng.choice([0, 0.02, 0.1])
    try:
        for _ in range(20_000):
            w.lease()
            w.check()
            if w.finished():
                break
            w.step(p_fail, p_die, p_lost)
            w.check()
        else:
            pytest.fail("the run did not finish")
    except ActorsKeepDying:
        pass  # allowed: actors died while starting more than workers * max_attempts times
    w.apply(w.d.stop())
    assert not w.d.held
    for k in range(w.n):  # after stop: every shard is done or back in the ledger
        assert k in w.done or k in w.pending
    for k in w.d.failed:  # given up: back in the ledger, unless another driver took it and did it
        assert w.failures[k] == w.max_attempts and not w.marked[k] and (k in w.pending or k in w.done)


def test_an_actor_death_requeues_its_other_shards_at_no_cost():
    d = Dispatcher(workers=1, per_actor=2, max_attempts=2)
    d.ready(0)
    assert d.leased([0, 1]) == [Submit(0, 0), Submit(1, 0)]
    d.progress(0, 5)
    d.progress(1, 2)
    actions = d.failed_attempt(0, "actor died", actor_died=True)
    assert actions == [Forget(0, 5), Forget(1, 2), Replace(0)]
    assert d.attempts == {0: 1}  # shard 1 was only queued behind it
    assert list(d.queue) == [0, 1]  # both go first, in their order, once the new actor is ready
    assert d.ready(0) == [Submit(0, 0), Submit(1, 0)]


def test_a_shard_is_given_up_after_max_attempts_and_released_at_stop():
    d = Dispatcher(workers=1, per_actor=1, max_attempts=2)
    d.ready(0)
    assert d.leased([7]) == [Submit(7, 0)]
    assert d.failed_attempt(7, "bad", actor_died=False) == [Forget(7, 0), Submit(7, 0)]
    assert d.failed_attempt(7, "bad again", actor_died=False) == [Forget(7, 0)]
    assert d.failed == {7: "bad again"} and 7 in d.held and d.wants() == 1
    assert d.leased([7]) == []  # the ledger cannot hand it back while held, and it is not retried
    assert d.stop() == [Release((7,))]


def test_lost_leases_drop_queued_shards_but_running_ones_finish():
    d = Dispatcher(workers=1, per_actor=1, max_attempts=1)
    d.ready(0)
    d.leased([0, 1])  # 0 runs, 1 waits in the queue
    d.lease_lost([0, 1])
    assert list(d.queue) == [] and d.held == {0}
    assert d.finished(0) == [MarkDone(0)]
    assert d.stop() == []


def test_actors_that_keep_dying_while_starting_stop_the_run():
    d = Dispatcher(workers=2, per_actor=1, max_attempts=2)
    for _ in range(4):
        assert d.start_failed(0, "node gone") == [Replace(0)]
    with pytest.raises(ActorsKeepDying, match="node gone"):
        d.start_failed(1, "node gone")


def test_a_draining_driver_submits_nothing_new_and_releases_what_it_holds():
    d = Dispatcher(workers=1, per_actor=1, max_attempts=3)
    d.ready(0)
    d.leased([3, 4])  # 3 runs, 4 waits
    d.drain()
    assert d.finished(3) == [MarkDone(3)]  # the free place is not refilled
    assert not d.busy() and list(d.queue) == [4]
    assert d.stop() == [Release((4,))]
