"""Shard files against the records that called them done: present, the recorded size, the
recorded sha256 (bit rot, a bad copy, a truncated upload).

The size check is a stat and runs wherever a shard directory is opened; the checksum reads
every byte, so it runs where asked (``distill status --verify``, ``distill embed --verify``)
and once per file in ``distill train``, which keeps what it verified (name, size, mtime,
sha256) in a small cache so a resume does not read everything again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from distill.storage import Storage

CHUNK = 8 << 20


@dataclass(frozen=True)
class Expected:
    """What a done record says a shard file is."""

    name: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Mismatch:
    name: str
    why: str  # "missing", "12,345 bytes, the record says 12,346", "sha256 differs from the record"


def file_sha256(storage: Storage, name: str) -> str:
    """sha256 of a file, streamed in 8 MiB reads (shards can be GBs)."""
    h = hashlib.sha256()
    with storage.open_input(name) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stamp(storage: Storage, name: str) -> str | None:
    """A local file's (size, mtime_ns): what says a verified file has not been touched since."""
    root = storage.root
    if not storage.is_local:
        return None
    st = os.stat(os.path.join(root, name))
    return f"{st.st_size}:{st.st_mtime_ns}"


def check(storage: Storage, expected: Iterable[Expected], *, checksum: bool,
          cache: Mapping[str, str] | None = None, progress: Callable[[int], None] | None = None,
          ) -> tuple[list[Mismatch], dict[str, str]]:
    """(mismatches, the cache for next time). ``cache`` maps ``name`` to ``stamp/sha256`` of
    files verified before: a local file with the same stamp is not read again."""
    mismatches, verified = [], {}
    for e in expected:
        if not storage.exists(e.name):
            mismatches.append(Mismatch(e.name, "missing"))
            continue
        size = storage.size(e.name)
        if size != e.bytes:
            mismatches.append(Mismatch(e.name, f"{size:,} bytes, the record says {e.bytes:,}"))
            continue
        if checksum:
            stamp = _stamp(storage, e.name)
            key = f"{stamp}/{e.sha256}" if stamp else None
            if key is None or (cache or {}).get(e.name) != key:
                if file_sha256(storage, e.name) != e.sha256:
                    mismatches.append(Mismatch(e.name, "sha256 differs from the record"))
                    continue
            if key:
                verified[e.name] = key
        if progress:
            progress(size)
    return mismatches, verified


def from_manifest(manifest: Mapping) -> list[Expected]:
    return [Expected(s["name"], s["bytes"], s["sha256"]) for s in manifest["shards"]]


def read_cache(path: str) -> dict[str, str]:
    try:
        with open(path) as f:
            return dict(json.load(f))
    except (OSError, ValueError):
        return {}


def write_cache(path: str, cache: Mapping[str, str]) -> None:
    from distill.storage import write_file_atomic

    write_file_atomic(path, json.dumps(dict(sorted(cache.items())), indent=0), durable=False)
