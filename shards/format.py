"""The shard file: one plain Parquet file per planned shard.

Columns: ``index`` int64, ``label`` int64 (0..C-1, or -1: no known identity), ``path`` string (when the source has paths),
``embedding`` fixed_size_list<float32|float16>[D] (raw teacher output), ``embedding_flip``
(the teacher on the mirrored image, when flip is on), ``embedding_views``
fixed_size_list<fixed_size_list<float32|float16>[D]>[K] (the teacher on the K augmented
views of ``distill.views``, when views are on), ``image`` binary (encoded JPEG or PNG bytes
at the teacher's input size, unless images are off).

The footer's key-value metadata makes each file self-describing, which is what lets a lost
ledger be rebuilt from the files alone: ``distill.run`` (the run identity), ``distill.shard``
(k, start, stop), ``distill.errors`` (rows that could not be embedded, with the reason) and
``distill.stats`` (the teacher embeddings' norm: count, sum, sum of squares, min, max).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from distill.errors import BadInput, BadOption, IncompatibleRun
from distill.storage import Storage

META_RUN = b"distill.run"
META_SHARD = b"distill.shard"
META_ERRORS = b"distill.errors"
META_STATS = b"distill.stats"
ROW_GROUP_ROWS = 256
UNLABELLED = -1  # the label of a row of no known identity (a flat folder of faces): distillation needs none
EMBEDDING_DTYPES = ("float32", "float16")
# The keywords of every Parquet read of shards, records and listings: decode on the calling
# thread. A row group is small, so Arrow's CPU pool gains nothing (docs/BENCHMARKS.md, "Parquet
# decoded on the calling thread"); and a process whose Arrow threads are still alive at exit can
# abort there ("terminate called without an active exception", apache/arrow#34314): seen once,
# after `distill export-npy` had written all its files. Read this way, one Arrow thread starts
# instead of three.
PARQUET_READ = {"use_threads": False}


@dataclass(frozen=True)
class RowError:
    """A listing row that could not be embedded, and why. Recorded, counted, never fatal."""

    index: int
    path: str
    reason: str


@dataclass(frozen=True)
class ShardRecord:
    """What the ledger and the manifest know of a done shard."""

    k: int
    rows: int
    bytes: int
    sha256: str
    errors: tuple[RowError, ...] = ()
    seconds: float = 0.0
    finished_at: float = 0.0
    norm: "NormStats | None" = None  # None: written before norms were recorded

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["errors"] = [asdict(e) for e in self.errors]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ShardRecord":
        d = dict(d)
        d["errors"] = tuple(RowError(**e) for e in d.get("errors", ()))
        d["norm"] = NormStats(**d["norm"]) if d.get("norm") else None
        return cls(**d)


@dataclass(frozen=True)
class NormStats:
    """The L2 norms of a shard's teacher embeddings, in a form that adds up over shards."""

    count: int
    sum: float
    sumsq: float
    min: float
    max: float

    @classmethod
    def of(cls, embedding: np.ndarray) -> "NormStats":
        if len(embedding) == 0:  # a shard whose every row was unreadable
            return cls(0, 0.0, 0.0, 0.0, 0.0)
        n = np.linalg.norm(np.asarray(embedding, np.float64).reshape(len(embedding), -1), axis=1)
        return cls(len(n), float(n.sum()), float(np.square(n).sum()), float(n.min()), float(n.max()))


def summarise_norms(stats: Sequence[NormStats]) -> dict[str, float] | None:
    """Mean, std, min and max of the norms over all shards (in the order given). Pure."""
    stats = [s for s in stats if s.count]
    if not stats:
        return None
    count = sum(s.count for s in stats)
    mean = sum(s.sum for s in stats) / count
    var = max(sum(s.sumsq for s in stats) / count - mean * mean, 0.0)
    return {"rows": count, "mean": round(mean, 4), "std": round(float(np.sqrt(var)), 4),
            "min": round(min(s.min for s in stats), 4), "max": round(max(s.max for s in stats), 4)}


def shard_schema(dim: int, dtype: str = "float32", flip: bool = True, images: bool = True, paths: bool = True,
                 views: int = 0):
    import pyarrow as pa

    if dtype not in EMBEDDING_DTYPES:
        raise BadOption(f"--dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got {dtype!r}")
    value = pa.float32() if dtype == "float32" else pa.float16()
    fields = [pa.field("index", pa.int64(), nullable=False), pa.field("label", pa.int64(), nullable=False)]
    if paths:
        fields.append(pa.field("path", pa.string()))
    fields.append(pa.field("embedding", pa.list_(value, dim), nullable=False))
    if flip:
        fields.append(pa.field("embedding_flip", pa.list_(value, dim), nullable=False))
    if views:
        fields.append(pa.field("embedding_views", pa.list_(pa.list_(value, dim), views), nullable=False))
    if images:
        fields.append(pa.field("image", pa.binary(), nullable=False))
    return pa.schema(fields)


def encode_shard(
    schema,
    *,
    index: np.ndarray,
    label: np.ndarray,
    embedding: np.ndarray,
    embedding_flip: np.ndarray | None = None,
    embedding_views: np.ndarray | None = None,
    path: Sequence[str] | None = None,
    image: Sequence[bytes] | None = None,
    run_id: str,
    k: int,
    start: int,
    stop: int,
    errors: Sequence[RowError] = (),
) -> bytes:
    """The Parquet bytes of one shard. Same inputs -> same bytes (no clocks, no hostnames)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(index)
    cols: dict[str, Any] = {
        "index": pa.array(np.asarray(index, np.int64)),
        "label": pa.array(np.asarray(label, np.int64)),
    }
    if "path" in schema.names:
        cols["path"] = pa.array(list(path) if path is not None else [None] * n, pa.string())
    cols["embedding"] = _fixed_list(embedding, schema.field("embedding").type)
    if "embedding_flip" in schema.names:
        if embedding_flip is None:
            raise ValueError("this shard schema has embedding_flip; pass the flipped embeddings")
        cols["embedding_flip"] = _fixed_list(embedding_flip, schema.field("embedding_flip").type)
    if "embedding_views" in schema.names:
        typ = schema.field("embedding_views").type
        if embedding_views is None or np.shape(embedding_views)[1:] != (typ.list_size, typ.value_type.list_size):
            raise ValueError(f"this shard schema has embedding_views [n, {typ.list_size}, {typ.value_type.list_size}]; "
                             f"got {None if embedding_views is None else np.shape(embedding_views)}")
        inner = _fixed_list(np.asarray(embedding_views).reshape(-1, typ.value_type.list_size), typ.value_type)
        cols["embedding_views"] = pa.FixedSizeListArray.from_arrays(inner, typ.list_size)
    if "image" in schema.names:
        cols["image"] = pa.array(list(image) if image is not None else [], pa.binary())
    meta = {
        META_RUN: run_id.encode(),
        META_SHARD: json.dumps({"k": k, "start": start, "stop": stop}).encode(),
        META_ERRORS: json.dumps([asdict(e) for e in errors]).encode(),
        META_STATS: json.dumps({"norm": asdict(NormStats.of(embedding))}).encode(),
    }
    table = pa.table(cols, schema=schema.with_metadata(meta))
    buf = io.BytesIO()
    # Images and floats do not compress, nor repeat: no compression, no dictionary (trying a
    # dictionary on them made encoding 6x slower and the file 20% bigger), no statistics.
    pq.write_table(
        table,
        buf,
        row_group_size=ROW_GROUP_ROWS,
        compression={c: ("zstd" if c in ("index", "label", "path") else "none") for c in schema.names},
        use_dictionary=["label", "path"],
        write_statistics=["index", "label"],
    )
    return buf.getvalue()


def _fixed_list(values: np.ndarray, typ):
    import pyarrow as pa

    dim = typ.list_size
    np_dtype = np.float16 if typ.value_type == pa.float16() else np.float32
    flat = np.ascontiguousarray(values, dtype=np_dtype).reshape(-1)
    if len(flat) % dim:
        raise ValueError(f"embeddings of size {len(flat)} do not split into rows of {dim}")
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_footer(storage: Storage, name: str) -> dict[str, Any]:
    """The shard's footer: run id, (k, start, stop), errors and row count. Raises on a bad file."""
    import pyarrow.parquet as pq

    with storage.open_input(name) as f:
        md = pq.ParquetFile(f).metadata
    kv = md.metadata or {}
    if META_RUN not in kv:
        raise BadInput(f"{storage.uri(name)} is a Parquet file but not a distill shard (no {META_RUN.decode()})")
    return {
        "run": kv[META_RUN].decode(),
        **json.loads(kv[META_SHARD]),
        "errors": tuple(RowError(**e) for e in json.loads(kv.get(META_ERRORS, b"[]"))),
        "rows": md.num_rows,
    }


def verify_shard(storage: Storage, name: str, run_id: str, k: int) -> ShardRecord:
    """Rebuild a done record from a shard file alone (reads it once, whole)."""
    import pyarrow.parquet as pq

    data = storage.read_bytes(name)
    pf = pq.ParquetFile(io.BytesIO(data))
    kv = pf.metadata.metadata or {}
    run = kv.get(META_RUN, b"").decode()
    if run != run_id:
        raise IncompatibleRun(
            f"{storage.uri(name)} was written by another run ({run or 'unknown'}), not {run_id}; "
            "it belongs to another listing, teacher or preprocessing. Use a new --out directory."
        )
    meta = json.loads(kv[META_SHARD])
    if meta["k"] != k:
        raise BadInput(f"{storage.uri(name)} holds shard {meta['k']}, not {k}")
    errors = tuple(RowError(**e) for e in json.loads(kv.get(META_ERRORS, b"[]")))
    norm = json.loads(kv[META_STATS])["norm"] if META_STATS in kv else None
    return ShardRecord(k=k, rows=pf.metadata.num_rows, bytes=len(data), sha256=sha256(data), errors=errors,
                       norm=NormStats(**norm) if norm else None)
