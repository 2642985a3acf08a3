"""The embed driver's dispatch rules as a pure state machine: events in, actions out.

The rules exactly-once depends on on the driver side live here, with no Ray, no ledger and
no clock: which leased shard goes to which teacher actor, what a failed attempt costs, what
happens to the shards queued on an actor that died, when a shard is given up. The Ray shell
(``distill.embed.sharded``) turns what it sees into events and carries out the actions it gets back:

    event                      what happened                  actions it can return
    leased(ks)                 the ledger gave us ks          Submit(k, slot): run k there
    ready(slot)                the actor loaded its teacher   Submit
    start_failed(slot, why)    the actor died while loading   Replace(slot): start another
    progress(k, rows)          rows of k embedded             -
    finished(k)                k's file is written            MarkDone(k), Submit
    failed_attempt(k, why, d)  k's attempt raised (d: died)   Forget(k, rows), Replace, Submit
    lease_lost(ks)             another driver took ks         -
    drain()                    the driver is stopping         - (nothing new is submitted)
    stop()                     the run ends                   Release(ks): hand leases back

A shard that fails ``max_attempts`` times is given up: kept in ``failed`` and held (so the
ledger does not hand it straight back) until ``stop`` releases it with the rest.

Invariants, swept in tests/unit/test_dispatch.py over random event orders: a shard is
submitted to at most one actor at a time, never marked done twice, never lost (it is done,
held here, or back in the ledger), and it costs at most ``max_attempts`` failed attempts; an
actor's death costs an attempt only to the shard that saw it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from distill.errors import DistillError


class ActorsKeepDying(DistillError):
    """Teacher actors die while starting more often than any run should tolerate."""


@dataclass(frozen=True)
class Submit:
    k: int
    slot: int


@dataclass(frozen=True)
class Forget:
    """Shard k's stream belongs to a dead actor: drop it; its ``rows`` were counted already."""

    k: int
    rows: int


@dataclass(frozen=True)
class Replace:
    slot: int


@dataclass(frozen=True)
class MarkDone:
    k: int


@dataclass(frozen=True)
class Release:
    ks: tuple[int, ...]


Action = Submit | Forget | Replace | MarkDone | Release


@dataclass
class _Slot:
    ready: bool = False
    inflight: list[int] = field(default_factory=list)


class Dispatcher:
    """One driver's view of its shards between the ledger and its actors."""

    def __init__(self, workers: int, per_actor: int, max_attempts: int):
        if workers < 1 or per_actor < 1 or max_attempts < 1:
            raise ValueError(f"workers, per_actor and max_attempts must be >= 1, got {workers}, {per_actor}, {max_attempts}")
        self.per_actor, self.max_attempts = per_actor, max_attempts
        self.slots = [_Slot() for _ in range(workers)]
        self.queue: deque[int] = deque()  # leased here, not yet submitted
        self.running: dict[int, int] = {}  # k -> slot
        self.rows: dict[int, int] = {}  # k -> rows its current attempt has reported
        self.attempts: dict[int, int] = {}
        self.failed: dict[int, str] = {}  # given up: k -> why
        self.held: set[int] = set()  # leases this driver holds (renewed, released on exit)
        self.start_failures = 0
        self.done = 0
        self.draining = False  # stopping: nothing new is submitted

    # ------------------------------------------------------------ what the shell asks

    def wants(self) -> int:
        """Shards to lease now: free places on ready actors not covered by the queue."""
        free = sum(self.per_actor - len(s.inflight) for s in self.slots if s.ready)
        return max(0, free - len(self.queue))

    def busy(self) -> bool:
        """Anything submitted that has not come back."""
        return bool(self.running)

    # ------------------------------------------------------------ events

    def leased(self, ks) -> list[Action]:
        new = [k for k in ks if k not in self.held]
        self.held.update(new)
        self.queue.extend(new)
        return self._fill()

    def ready(self, slot: int) -> list[Action]:
        self.slots[slot].ready = True
        return self._fill()

    def start_failed(self, slot: int, why: str) -> list[Action]:
        """The actor in ``slot`` died before it was ready (its node went away): start another,
        up to ``max_attempts`` deaths per worker over the run."""
        self.start_failures += 1
        if self.start_failures > len(self.slots) * self.max_attempts:
            raise ActorsKeepDying(f"teacher actors keep dying while starting ({self.start_failures} times): {why}")
        self.slots[slot] = _Slot()
        return [Replace(slot)]

    def progress(self, k: int, rows: int) -> None:
        if k in self.running:
            self.rows[k] = self.rows.get(k, 0) + rows

    def finished(self, k: int) -> list[Action]:
        """Shard k's file is written and verified by its actor."""
        slot = self.running.pop(k)
        self.slots[slot].inflight.remove(k)
        self.rows.pop(k, None)
        self.held.discard(k)
        self.done += 1
        return [MarkDone(k), *self._fill()]

    def failed_attempt(self, k: int, why: str, actor_died: bool) -> list[Action]:
        """Shard k's attempt raised. If its actor died, the actor is replaced and the shards
        queued behind k on it go back to the front of the queue without spending an attempt."""
        slot = self.running.pop(k)
        actions: list[Action] = [Forget(k, self.rows.pop(k, 0))]
        self.attempts[k] = self.attempts.get(k, 0) + 1
        if actor_died:
            orphans = [kk for kk in self.slots[slot].inflight if kk != k]
            for kk in reversed(orphans):
                del self.running[kk]
                actions.append(Forget(kk, self.rows.pop(kk, 0)))
                self.queue.appendleft(kk)
            self.slots[slot] = _Slot()
            actions.append(Replace(slot))
        else:
            self.slots[slot].inflight.remove(k)
        if self.attempts[k] < self.max_attempts:
            self.queue.appendleft(k)
        else:
            # Given up: still held (so the ledger does not hand it straight back to us), and
            # released with the rest by ``stop``, for a rerun or another driver to try.
            self.failed[k] = why
        return actions + self._fill()

    def lease_lost(self, ks) -> list[Action]:
        """Another driver holds these now. Queued ones are dropped (it will do them); running
        ones go on: every owner writes the same bytes and completion is accepted from any."""
        lost = set(ks) & self.held
        self.queue = deque(k for k in self.queue if k not in lost)
        self.held -= lost - set(self.running)
        return []

    def drain(self) -> None:
        """The driver is stopping: submit nothing new. Queued shards stay held until ``stop``."""
        self.draining = True

    def stop(self) -> list[Action]:
        """The run ends here (done, interrupted or crashed): every lease still held goes back."""
        held = tuple(sorted(self.held))
        self.held.clear()
        self.queue.clear()
        return [Release(held)] if held else []

    # ------------------------------------------------------------ internal

    def _fill(self) -> list[Action]:
        out: list[Action] = []
        for i, s in enumerate(self.slots):
            while s.ready and len(s.inflight) < self.per_actor and self.queue and not self.draining:
                k = self.queue.popleft()
                s.inflight.append(k)
                self.running[k] = i
                self.rows[k] = 0
                out.append(Submit(k, i))
        return out
