"""Shard planning: a pure function of (row count, shard size).

Shard k holds listing rows ``[k*N, min((k+1)*N, total))``. Names come from the plan, never
from a worker or a clock, so every driver and every rerun agrees on what ``part-00042`` is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from distill.errors import BadOption

SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"
_NAME_RE = re.compile(r"^part-(\d{5,})\.parquet$")


@dataclass(frozen=True, order=True)
class Shard:
    """One planned shard: rows ``[start, stop)`` of the listing."""

    k: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return shard_name(self.k)


def shard_name(k: int) -> str:
    """``part-00042.parquet``; widens past five digits rather than wrapping."""
    if k < 0:
        raise ValueError(f"shard number must be >= 0, got {k}")
    return f"{SHARD_PREFIX}{k:05d}{SHARD_SUFFIX}"


def parse_shard_name(name: str) -> int | None:
    """The shard number of a file name, or None when it is not a shard file."""
    m = _NAME_RE.match(name)
    return int(m.group(1)) if m else None


def num_shards(total: int, shard_size: int) -> int:
    _check(total, shard_size)
    return -(-total // shard_size)


def shard_at(k: int, total: int, shard_size: int) -> Shard:
    n = num_shards(total, shard_size)
    if not 0 <= k < n:
        raise ValueError(f"shard {k} is outside the plan of {n} shards")
    return Shard(k, k * shard_size, min((k + 1) * shard_size, total))


def plan_shards(total: int, shard_size: int) -> tuple[Shard, ...]:
    """Every shard of the plan, in order. Costs one small object per shard."""
    return tuple(shard_at(k, total, shard_size) for k in range(num_shards(total, shard_size)))


def batches(shard: Shard, batch_size: int) -> tuple[tuple[int, int], ...]:
    """The teacher batches of one shard as listing row ranges; the last may be short.

    Part of the plan: same shard and batch size -> same batches -> same floats.
    """
    if batch_size <= 0:
        raise BadOption(f"--batch-size must be a positive number of images, got {batch_size}")
    return tuple((s, min(s + batch_size, shard.stop)) for s in range(shard.start, shard.stop, batch_size))


def _check(total: int, shard_size: int) -> None:
    if shard_size <= 0:
        raise BadOption(f"--shard-size must be a positive number of rows, got {shard_size}")
    if total < 0:
        raise ValueError(f"a listing cannot have {total} rows")
