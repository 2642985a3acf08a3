"""Reading a shard directory: the one reader every consumer of the shards uses.

``format`` writes a shard; this module reads them back, so the two directions of the format
live together (the mosaicml/streaming habit) and nobody else decodes Parquet by hand:

- ``ShardSet``: what a directory's manifest says about its shards (names, rows, teacher,
  input size, views), with the *sample id* space: shard k's rows laid end to end.
  ``open_shards`` opens one for training (complete, with images).
- ``ShardFile``: one open shard, read by row ranges (only the row groups a range covers).
- ``ShardReader``: ``scan`` (every row group of every shard, in order: one streaming pass),
  ``read_rows`` (given sample ids, in their order) and ``first`` (the first rows).
- ``embeddings``: a ``fixed_size_list<float>[D]`` (or ``[K][D]``) column as a NumPy array.

No TensorFlow, no Ray: the trainer's input, its validation and centres, export's check
images and ``export-npy`` all read through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from distill.errors import BadInput, NoManifest
from distill.shards.format import PARQUET_READ


@dataclass(frozen=True)
class ShardSet:
    """What a shard directory's manifest says, for its readers."""

    location: str
    run_id: str
    names: tuple[str, ...]
    rows: tuple[int, ...]
    embedding_dim: int
    num_classes: int
    input_size: tuple[int, int]
    flip: bool
    dtype: str
    views: dict | None = None  # the stored views' parameters, as recorded (None: no views stored)
    teacher: dict | None = None  # path, signature, output and preprocessing the embed run used
    teacher_norm: dict | None = None  # raw teacher norms: rows, mean, std, min, max
    images: bool = True
    complete: bool = True
    unlabelled: int = 0  # listing rows of no known identity (label -1)

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    @property
    def offsets(self) -> np.ndarray:
        """Sample id of each shard's first row (shards laid end to end), and the total."""
        return np.concatenate([[0], np.cumsum(np.asarray(self.rows, np.int64))])

    @classmethod
    def from_manifest(cls, location: str, manifest: dict) -> "ShardSet":
        """The done shards a manifest lists, in shard order. Pure."""
        shards = sorted(manifest["shards"], key=lambda s: s["k"])
        h, w = manifest["input_size"]
        return cls(
            location=location,
            run_id=manifest["run_id"],
            names=tuple(s["name"] for s in shards),
            rows=tuple(int(s["rows"]) for s in shards),
            embedding_dim=int(manifest["embedding_dim"]),
            num_classes=int(manifest["num_classes"]),
            input_size=(int(h), int(w)),
            flip=bool(manifest.get("flip", False)),
            dtype=manifest.get("dtype", "float32"),
            views=manifest.get("views") or None,
            teacher={"path": manifest.get("teacher"), "signature": manifest.get("teacher_signature"),
                     "preprocessing": manifest.get("preprocessing")},
            teacher_norm=manifest.get("teacher_norm"),
            images=bool(manifest.get("images", False)),
            complete=bool(manifest.get("complete", False)),
            unlabelled=int(manifest.get("unlabelled") or 0),
        )


def shard_set(location: str, manifest: dict) -> ShardSet:
    """The shards of a manifest a student can be trained on: complete, with images. Pure."""
    if not manifest.get("images", False):
        raise BadInput(
            f"the shards in {location} hold no images (embedded with --no-images); the student trains on "
            "pixels, so rerun `distill embed` without --no-images into a new --out directory"
        )
    if not manifest.get("complete", False):
        missing = int(manifest.get("num_shards", 0)) - len(manifest.get("shards", ()))
        raise BadInput(
            f"the shards in {location} are incomplete: {missing} of {manifest.get('num_shards')} shards are "
            "missing. Finish `distill embed` first (rerun the same embed command; it resumes)"
        )
    shards = ShardSet.from_manifest(location, manifest)
    if not shards.names or shards.total_rows == 0:
        raise BadInput(f"the shards in {location} hold no rows; check the listing given to `distill embed`")
    return shards


def read_shard_set(location: str) -> ShardSet:
    """The manifest of ``location`` as a ``ShardSet`` of its done shards, complete or not."""
    return ShardSet.from_manifest(location, _manifest(location))


def open_shards(location: str) -> ShardSet:
    """The shards of ``location`` for training (``shard_set``'s checks)."""
    return shard_set(location, _manifest(location))


def _manifest(location: str) -> dict:
    from distill.shards.manifest import load_manifest

    try:
        return load_manifest(location)
    except NoManifest:
        raise
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}: pass the shard directory written by `distill embed ... --out DIR`") from None


def embeddings(column, dim: int, views: int = 0) -> np.ndarray:
    """A ``fixed_size_list<float>[dim]`` column (``[views][dim]`` when ``views``) as float32
    ``[rows, dim]`` (``[rows, views, dim]``); float16 shards are widened."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = arr.values.values if views else arr.values
    shape = (-1, views, dim) if views else (-1, dim)
    return values.to_numpy(zero_copy_only=False).reshape(shape).astype(np.float32, copy=False)


class ShardFile:
    """One open shard file: reads of row ranges, only the row groups a range covers."""

    def __init__(self, storage, name: str, rows: int):
        import pyarrow.parquet as pq

        self.uri = storage.uri(name)
        self._f = storage.open_input(name)
        try:
            self._pf = pq.ParquetFile(self._f)
            md = self._pf.metadata
            if md.num_rows != rows:
                raise BadInput(f"{self.uri} has {md.num_rows} rows but the manifest says {rows}; the shard "
                               "directory was modified after embedding: rerun `distill embed`")
        except BaseException:
            self._f.close()
            raise
        self.rows = rows
        self.columns = tuple(self._pf.schema_arrow.names)
        sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    def read(self, lo: int, hi: int, columns: Sequence[str]):
        """Rows ``[lo, hi)`` of the shard as a pyarrow Table of ``columns``."""
        import pyarrow as pa

        g0 = int(np.searchsorted(self.starts, lo, side="right") - 1)
        g1 = int(np.searchsorted(self.starts, hi, side="left"))
        tables = [self._pf.read_row_group(g, columns=list(columns), **PARQUET_READ) for g in range(g0, g1)]
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        return table.slice(lo - int(self.starts[g0]), hi - lo)

    def row_groups(self, columns: Sequence[str]) -> Iterator[tuple[int, object]]:
        """(first row, Table) of every row group, in order."""
        for g in range(len(self.starts) - 1):
            yield int(self.starts[g]), self._pf.read_row_group(g, columns=list(columns), **PARQUET_READ)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "ShardFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardReader:
    """Reads a ``ShardSet``'s files, by sample id (the shards' rows laid end to end)."""

    def __init__(self, shards: ShardSet):
        from distill.storage import open_storage

        self.shards = shards
        self.storage = open_storage(shards.location, create=False)

    def open(self, k: int) -> ShardFile:
        return ShardFile(self.storage, self.shards.names[k], self.shards.rows[k])

    def scan(self, columns: Sequence[str], progress=None) -> Iterator[tuple[int, int, object]]:
        """(shard, first sample id, Table) of every row group of every shard, in sample-id order:
        one streaming pass, one row group in memory at a time. ``progress(1)`` after each shard."""
        offsets = self.shards.offsets
        for k in range(len(self.shards.names)):
            with self.open(k) as f:
                for start, table in f.row_groups(columns):
                    yield k, int(offsets[k]) + start, table
            if progress is not None:
                progress(1)

    def read_rows(self, ids: np.ndarray, columns: Sequence[str]):
        """The rows of sample ids ``ids`` (in that order) as one Table; each shard is opened once."""
        import pyarrow as pa

        ids = np.asarray(ids, np.int64)
        offsets = self.shards.offsets
        if len(ids) and (ids.min() < 0 or ids.max() >= offsets[-1]):
            raise ValueError(f"sample ids outside 0..{int(offsets[-1]) - 1}")
        shard_of = np.searchsorted(offsets, ids, side="right") - 1
        parts, where = [], []
        for k in np.unique(shard_of).tolist():
            mine = np.flatnonzero(shard_of == k)
            local = ids[mine] - offsets[k]
            with self.open(k) as f:
                parts.append(f.read(0, f.rows, columns).take(pa.array(local)))
            where.append(mine)
        if not parts:
            return None
        table = pa.concat_tables(parts)
        return table.take(pa.array(np.argsort(np.concatenate(where), kind="stable")))

    def first(self, n: int, columns: Sequence[str]):
        """The first ``n`` rows (fewer if the shards hold fewer), reading only the row groups needed."""
        import pyarrow as pa

        tables, got = [], 0
        for _, _, table in self.scan(columns):
            tables.append(table.slice(0, n - got))
            got += len(tables[-1])
            if got >= n:
                break
        return pa.concat_tables(tables) if tables else None
