"""The shard ledger: who works on which shard. pending -> leased(owner, expiry) -> done.

The decisions (which shards to hand out, whether a lease is live) are pure functions of a
state snapshot and a clock reading passed in (``distill.shards.lease``). Backends only store
state atomically:
``FileLedger`` (the embedded default: files under ``<shards>/_ledger``, one ``flock`` as
the mutex) and ``RedisLedger`` (``distill.shards.ledger_redis``, for clusters); ``open_ledger`` is the one
place that picks the backend. The shard files
stay the truth: ``rebuild`` restores a lost ledger from them.

A lease expires unless renewed, so a dead driver's shards return to pending. ``complete``
is idempotent and accepted from any owner: every owner of a shard writes the same bytes.
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import Iterable, Sequence

from distill.errors import BadOption
from distill.shards.format import ShardRecord

# The lease types and decisions, re-exported for callers of the ledger.
from distill.shards.lease import (  # noqa: F401
    Lease,
    Ledger,
    LedgerState,
    dead_local_owners,
    lease_is_live,
    new_owner,
    owner_host_pid,
    pick_shards,
)
from distill.storage import fsync_dir, write_file_atomic

LEDGER_DIR = "_ledger"


# ---------------------------------------------------------------- file backend

class FileLedger:
    """Ledger files next to the shards: ``<k>.lease`` and ``<k>.done`` under one flock.

    Works for any number of drivers on one machine or on a shared POSIX filesystem with
    working locks (local disk, NFSv4). Object stores have no locks: use the Redis ledger.
    """

    def __init__(self, shard_dir: str, num_shards: int):
        self.num_shards = num_shards
        self.dir = os.path.join(shard_dir, LEDGER_DIR)
        os.makedirs(self.dir, exist_ok=True)
        self._lock_path = os.path.join(self.dir, "lock")

    def describe(self) -> str:
        return f"file ledger {self.dir}"

    # -- storage helpers (call with the lock held)
    def _lock(self):
        return _Flock(self._lock_path)

    def _path(self, k: int, kind: str) -> str:
        return os.path.join(self.dir, f"{k:05d}.{kind}")

    def _write(self, path: str, obj: dict, durable: bool) -> None:
        write_file_atomic(path, json.dumps(obj), durable)  # (a full disk: nothing half-written is left)

    def _scan(self, with_records: bool) -> tuple[dict[int, Lease], dict[int, ShardRecord | None]]:
        leases: dict[int, Lease] = {}
        done: dict[int, ShardRecord | None] = {}
        for name in os.listdir(self.dir):
            stem, _, kind = name.partition(".")
            if not stem.isdigit():
                continue
            k = int(stem)
            if kind == "lease":
                try:
                    with open(os.path.join(self.dir, name)) as f:
                        d = json.load(f)
                    leases[k] = Lease(k, d["owner"], d["expires"])
                except (OSError, ValueError, KeyError):
                    continue  # a torn lease is as good as none
            elif kind == "done":
                done[k] = None
                if with_records:
                    with open(os.path.join(self.dir, name)) as f:
                        done[k] = ShardRecord.from_json(json.load(f))
        return leases, done

    # -- interface
    def acquire(self, owner: str, n: int, ttl: float, now: float) -> list[int]:
        with self._lock():
            leases, done = self._scan(with_records=False)
            dead = dead_local_owners({lease.owner for lease in leases.values()} - {owner})
            ks = pick_shards(self.num_shards, done, leases, now, n, dead)
            for k in ks:
                self._write(self._path(k, "lease"), {"owner": owner, "expires": now + ttl}, durable=False)
            return ks

    def renew(self, owner: str, ks: Sequence[int], ttl: float, now: float) -> list[int]:
        held = []
        with self._lock():
            leases, done = self._scan(with_records=False)
            for k in ks:
                lease = leases.get(k)
                if k not in done and lease is not None and lease.owner == owner:
                    self._write(self._path(k, "lease"), {"owner": owner, "expires": now + ttl}, durable=False)
                    held.append(k)
        return held

    def release(self, owner: str, ks: Sequence[int]) -> None:
        with self._lock():
            leases, _ = self._scan(with_records=False)
            for k in ks:
                if k in leases and leases[k].owner == owner:
                    _unlink(self._path(k, "lease"))

    def complete(self, owner: str, record: ShardRecord) -> None:
        with self._lock():
            done_path = self._path(record.k, "done")
            if not os.path.exists(done_path):
                self._write(done_path, record.to_json(), durable=True)
            _unlink(self._path(record.k, "lease"))

    def snapshot(self) -> LedgerState:
        with self._lock():
            leases, done = self._scan(with_records=True)
        return LedgerState(self.num_shards, leases, {k: r for k, r in done.items() if r is not None})

    def forget(self, ks: Sequence[int]) -> None:
        with self._lock():
            for k in ks:
                _unlink(self._path(k, "done"))

    def rebuild(self, records: Iterable[ShardRecord]) -> None:
        records = list(records)
        with self._lock():
            for name in os.listdir(self.dir):
                if name != "lock":
                    _unlink(os.path.join(self.dir, name))
            for r in records:
                self._write(self._path(r.k, "done"), r.to_json(), durable=False)
            fsync_dir(self.dir)

    def close(self) -> None:
        pass


class _Flock:
    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def open_ledger(spec: str, shard_dir: str, num_shards: int, run_id: str) -> Ledger:
    """``file`` (default: next to the shards) or ``redis://[:password@]host:port/db``."""
    if spec in ("", "file"):
        if "://" in shard_dir and not shard_dir.startswith("file://"):
            raise BadOption(
                f"the file ledger needs a local or NFS --out, not {shard_dir}; "
                "use --ledger redis://HOST:PORT/DB with object-store outputs"
            )
        return FileLedger(shard_dir.removeprefix("file://"), num_shards)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from distill.shards.ledger_redis import RedisLedger

        return RedisLedger.from_url(spec, run_id=run_id, num_shards=num_shards)
    raise BadOption(f"--ledger must be 'file' or a redis:// URL, got {spec!r}")
