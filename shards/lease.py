"""Leases: who works on which shard. The pure decisions (which shards to hand out, whether a
lease is live, which local owners are dead) over a state snapshot and a clock reading passed
in, and the ``Ledger`` interface every backend implements (``distill.shards.ledger``: files,
the default; ``distill.shards.ledger_redis``: Redis, for clusters). Imports no backend.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Protocol, Sequence

from distill.shards.format import ShardRecord


@dataclass(frozen=True)
class Lease:
    k: int
    owner: str
    expires: float


@dataclass(frozen=True)
class LedgerState:
    num_shards: int
    leases: Mapping[int, Lease] = field(default_factory=dict)
    done: Mapping[int, ShardRecord] = field(default_factory=dict)

    def counts(self, now: float) -> dict[str, int]:
        live = sum(1 for k, lease in self.leases.items() if k not in self.done and lease.expires > now)
        return {"done": len(self.done), "leased": live, "pending": self.num_shards - len(self.done) - live}


# ---------------------------------------------------------------- pure decisions

def new_owner(role: str = "driver") -> str:
    """``host:pid:role:token``: unique per process start, and says where it runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{role}:{secrets.token_hex(3)}"


def owner_host_pid(owner: str) -> tuple[str, int] | None:
    parts = owner.split(":")
    if len(parts) >= 2 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None


def lease_is_live(lease: Lease | None, now: float, dead_owners: frozenset[str] = frozenset()) -> bool:
    return lease is not None and lease.expires > now and lease.owner not in dead_owners


def pick_shards(
    num_shards: int,
    done: Iterable[int],
    leases: Mapping[int, Lease],
    now: float,
    n: int,
    dead_owners: frozenset[str] = frozenset(),
) -> list[int]:
    """Up to ``n`` shards to lease: lowest numbers first, skipping done and live leases.

    Lowest-first keeps the finished prefix contiguous, which is what a user watching
    ``status`` expects and what makes a half-done run cheap to reason about.
    """
    done_set = set(done)
    out: list[int] = []
    for k in range(num_shards):
        if len(out) >= n:
            break
        if k in done_set or lease_is_live(leases.get(k), now, dead_owners):
            continue
        out.append(k)
    return out


def dead_local_owners(owners: Iterable[str], host: str | None = None) -> frozenset[str]:
    """Owners on this host whose process is gone: their leases need not wait for expiry."""
    host = host or socket.gethostname()
    dead = set()
    for o in owners:
        hp = owner_host_pid(o)
        if hp and hp[0] == host and not _pid_alive(hp[1]):
            dead.add(o)
    return frozenset(dead)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- interface

class Ledger(Protocol):
    num_shards: int

    def acquire(self, owner: str, n: int, ttl: float, now: float) -> list[int]:
        """Lease up to n pending (or expired) shards to owner; returns their numbers."""

    def renew(self, owner: str, ks: Sequence[int], ttl: float, now: float) -> list[int]:
        """Extend owner's leases on ks; returns the ones it still holds."""

    def release(self, owner: str, ks: Sequence[int]) -> None:
        """Give leases back (pending again), e.g. after a failed attempt."""

    def complete(self, owner: str, record: ShardRecord) -> None:
        """Mark a shard done. Only after its file is durable. Idempotent, any owner."""

    def snapshot(self) -> LedgerState:
        """All leases and done records, for status, the manifest and reconciliation."""

    def forget(self, ks: Sequence[int]) -> None:
        """Drop done records whose files are gone, so they are redone."""

    def rebuild(self, records: Iterable[ShardRecord]) -> None:
        """Replace every done record with these (from the shard files); leases are dropped."""

    def describe(self) -> str:
        """Where it lives, safe to print (no passwords)."""

    def close(self) -> None: ...
