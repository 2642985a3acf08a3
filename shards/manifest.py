"""``manifest.json``: what a shard directory holds, written last (temp + rename).

It names the run identity (listing and teacher fingerprints, preprocessing, embedding dim,
classes, plan) and every done shard with its rows, bytes and checksum. A shard is done only
when its file is durable *and* it is listed here. The manifest holds no clocks, so an
interrupted-and-resumed run ends with the same manifest bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

from distill.errors import BadInput, IncompatibleRun, NoManifest
from distill.shards.format import ShardRecord, summarise_norms
from distill.shards.plan import shard_at, shard_name
from distill.storage import Storage

MANIFEST = "manifest.json"
FORMAT = "distill-shards/1"

# Fields that decide the floats: a rerun must match all of them to share a directory.
IDENTITY_FIELDS = (
    "listing_fingerprint",
    "rows",
    "num_classes",
    "teacher_fingerprint",
    "input_size",
    "preprocessing",
    "embedding_dim",
    "dtype",
    "flip",
    "images",
    "shard_size",
    "batch_size",
    "views",
)
# Identity fields added after the first format: absent (None) they leave a run's id as it was.
OPTIONAL_FIELDS = frozenset({"views"})
# ``distill align`` runs (identity "kind": "align") write the same manifest over their own
# fields: what decides the aligned pixels.
ALIGN_IDENTITY_FIELDS = ("kind", "listing_fingerprint", "rows", "detector", "landmarks_fingerprint", "size",
                         "all_faces", "quality", "shard_size")


def identity_fields(identity: Mapping[str, Any]) -> tuple[str, ...]:
    """The fields that make a run what it is: the teacher pass's, or an align run's."""
    return ALIGN_IDENTITY_FIELDS if identity.get("kind") == "align" else IDENTITY_FIELDS


def run_id(identity: Mapping[str, Any]) -> str:
    fields = {k: identity.get(k) for k in identity_fields(identity)}
    fields = {k: v for k, v in fields.items() if not (k in OPTIONAL_FIELDS and v is None)}
    canon = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def check_compatible(existing: Mapping[str, Any], wanted: Mapping[str, Any], where: str) -> None:
    """Raise IncompatibleRun naming every field that differs, and what to do."""
    diffs = [
        f"  {k}: directory has {existing.get(k)!r}, this command has {wanted.get(k)!r}"
        for k in identity_fields(wanted)
        if existing.get(k) != wanted.get(k)
    ]
    if diffs:
        raise IncompatibleRun(
            f"{where} holds shards of another run; refusing to mix them:\n"
            + "\n".join(diffs)
            + "\nRerun with the original options, or write to a new --out directory."
        )


def build_manifest(identity: Mapping[str, Any], records: Iterable[ShardRecord], num_shards: int) -> dict[str, Any]:
    """The manifest for these done records. Pure: same records -> same dict."""
    recs = sorted(records, key=lambda r: r.k)
    shards = []
    errors = []
    for r in recs:
        s = shard_at(r.k, identity["rows"], identity["shard_size"])
        shards.append(
            {"name": shard_name(r.k), "k": r.k, "start": s.start, "stop": s.stop, "rows": r.rows,
             "bytes": r.bytes, "sha256": r.sha256, "errors": len(r.errors)}
        )
        errors.extend({"shard": r.k, "index": e.index, "path": e.path, "reason": e.reason} for e in r.errors)
    return {
        "format": FORMAT,
        "run_id": run_id(identity),
        **{k: identity[k] for k in sorted(identity)},
        "num_shards": num_shards,
        "complete": len(recs) == num_shards,
        "rows_done": sum(r.rows for r in recs),
        "error_count": len(errors),
        # What the targets look like (raw teacher norms), when every shard recorded them.
        "teacher_norm": summarise_norms([r.norm for r in recs]) if all(r.norm for r in recs) else None,
        "shards": shards,
        "errors": errors,
    }


def write_manifest(storage: Storage, manifest: Mapping[str, Any]) -> None:
    storage.write_atomic(MANIFEST, (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode())


def read_manifest(storage: Storage) -> dict[str, Any] | None:
    if not storage.exists(MANIFEST):
        return None
    try:
        m = json.loads(storage.read_bytes(MANIFEST))
    except json.JSONDecodeError as e:
        raise BadInput(f"{storage.uri(MANIFEST)} is not valid JSON ({e}); delete it and rerun to rebuild it") from e
    if m.get("format") != FORMAT:
        raise BadInput(f"{storage.uri(MANIFEST)} has format {m.get('format')!r}, expected {FORMAT!r}")
    return m


def load_manifest(location: str) -> dict[str, Any]:
    """The manifest of a shard directory, for readers (trainer, status, export-npy)."""
    from distill.storage import open_storage

    m = read_manifest(open_storage(location, create=False))
    if m is None:
        raise NoManifest(f"no {MANIFEST} in {location}: run `distill embed ... --out {location}` first")
    return m
