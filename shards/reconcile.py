"""Ledger vs shard files: the files are the truth.

At start a driver compares what the ledger says is done with the shard files present:
a done record whose file is gone (or has another size) is forgotten and redone; a file the
ledger does not know (a driver killed between rename and ``complete``) is verified and
marked done. ``distill ledger rebuild`` restores a whole ledger the same way.
"""

from __future__ import annotations

import logging
from typing import Mapping

from distill.errors import IncompatibleRun
from distill.shards.format import ShardRecord, verify_shard
from distill.shards.plan import parse_shard_name
from distill.storage import Storage

log = logging.getLogger(__name__)


def plan_reconcile(
    done_sizes: Mapping[int, int], file_sizes: Mapping[int, int], num_shards: int
) -> tuple[list[int], list[int]]:
    """(done records to forget, files to verify and adopt). Pure."""
    forget = sorted(k for k, size in done_sizes.items() if file_sizes.get(k) != size)
    adopt = sorted(k for k in file_sizes if k not in done_sizes and 0 <= k < num_shards)
    return forget, adopt


def shard_files(storage: Storage, num_shards: int | None = None) -> dict[int, int]:
    """{k: size} of the shard files present (temp files and other names ignored)."""
    out = {}
    for name in storage.list():
        k = parse_shard_name(name)
        if k is not None and (num_shards is None or k < num_shards):
            out[k] = storage.size(name)
    return out


def adopt_file(storage: Storage, run_id: str, k: int) -> ShardRecord | None:
    """A done record for shard k's file, or None when the file is unreadable (it is removed
    so the shard is redone). A file of another run raises: never mix runs."""
    from distill.shards.plan import shard_name

    name = shard_name(k)
    try:
        return verify_shard(storage, name, run_id, k)
    except IncompatibleRun:
        raise
    except ValueError as e:  # BadInput, or pyarrow's ArrowInvalid
        log.warning("removing unreadable shard %s (%s); it will be redone", storage.uri(name), e)
    except OSError as e:  # pyarrow raises ArrowInvalid (a ValueError) or OSError for bad footers
        log.warning("removing unreadable shard %s (%s); it will be redone", storage.uri(name), e)
    storage.remove(name)
    return None


def records_from_files(storage: Storage, run_id: str, num_shards: int) -> list[ShardRecord]:
    """Done records for every valid shard file: what a rebuilt ledger holds."""
    recs = []
    for k in sorted(shard_files(storage, num_shards)):
        r = adopt_file(storage, run_id, k)
        if r is not None:
            recs.append(r)
    return recs
