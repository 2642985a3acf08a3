"""Align's shard files: a record per face written, in the footer every shard file has (run,
shard, the rows that gave none with their reason), so the ledger, reconcile, the manifest and
``distill status --errors`` treat them as they treat the embedding shards
(``distill.shards.format``). Written by ``workers.align_actor``, read by ``distill align``
(its ``--rec`` pack). Pure pyarrow: no TensorFlow, no Ray."""

from __future__ import annotations

import io
import json
from dataclasses import asdict

from distill.shards.format import META_ERRORS, META_RUN, META_SHARD, PARQUET_READ, RowError
from distill.shards.plan import Shard


def encode_records(records: list[dict], errors: list[RowError], run_id: str, shard: Shard) -> bytes:
    """A shard's record file: a row per face written (source, output, box, 5 points,
    confidence), with the footer every shard file has: run, shard, and the photos that gave
    none with their reason (which the manifest and ``distill status --errors`` list). Same
    inputs, same bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        pa.field("index", pa.int64(), nullable=False), pa.field("source", pa.string()), pa.field("output", pa.string()),
        pa.field("face", pa.int32()), pa.field("box", pa.list_(pa.float64(), 4)),
        pa.field("points", pa.list_(pa.float64(), 10)), pa.field("confidence", pa.float64()),
    ], metadata={
        META_RUN: run_id.encode(),
        META_SHARD: json.dumps({"k": shard.k, "start": shard.start, "stop": shard.stop}).encode(),
        META_ERRORS: json.dumps([asdict(e) for e in errors]).encode(),
    })
    table = pa.Table.from_pylist(sorted(records, key=lambda r: (r["index"], r["face"])), schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def read_records(storage, name: str, columns: list[str]):
    """A shard's record file (``encode_records``) as a pyarrow Table of ``columns``."""
    import pyarrow.parquet as pq

    with storage.open_input(name) as f:
        return pq.read_table(f, columns=columns, **PARQUET_READ)
