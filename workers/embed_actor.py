"""The teacher worker: loads the teacher once, turns whole shards into Parquet files.

``EmbedWorker`` is a plain class (unit-testable without Ray); the embed driver wraps it with
``ray.remote`` and asks one GPU (or some CPUs) per actor. ``embed_shard`` is a generator: it
yields the number of rows finished after each teacher batch (the driver's progress bar),
then the shard's done record once the file is durable under its final name.

The work overlaps in two places: decode threads read, decode and preprocess the next batch
(its mirror, and with ``--views K`` its K augmented views) while the teacher runs this one, and the actor runs two
shards at once so one shard's Parquet encode and write overlaps the next shard's teacher
batches (a lock keeps one shard on the teacher at a time, so batches and floats do not change).

Exactly-once lives in the write, not in Ray: the shard is computed in full, written to a temp
name, fsynced and renamed. A restarted actor or a retried task rewrites the same bytes.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator

import numpy as np

from distill.images import UnreadableImage, prepare, read_file
from distill.shards.format import NormStats, RowError, ShardRecord, encode_shard, sha256, shard_schema
from distill.shards.plan import Shard, batches
from distill.storage import is_uri, open_storage
from distill.teacher import Preprocessing, TeacherSpec, fetch_teacher, load_teacher
from distill.views import ViewParams, ViewSpec, render, view_params

if TYPE_CHECKING:
    from distill.embed.listing import ListingRows


@dataclass(frozen=True)
class EmbedTask:
    """Everything an actor needs, fixed for the whole run (shipped once, at construction)."""

    teacher: TeacherSpec
    pre: Preprocessing
    out: str
    run_id: str
    batch_size: int
    flip: bool = True
    views: ViewSpec = ViewSpec()
    dtype: str = "float32"
    images: bool = True
    paths: bool = True
    rec: str | None = None
    threads: int | None = None  # the teacher's intra-op threads; None = its runtime's default
    gpus: float = 0.0  # each actor's GPUs (an ONNX teacher runs on CUDA with them)
    decode_threads: int = 4
    teacher_fingerprint: str | None = None  # the driver's: a teacher fetched from a store must be this one


class EmbedWorker:
    def __init__(self, task: EmbedTask):
        if task.teacher.format == "savedmodel":
            _configure_tensorflow(task.threads)  # (an ONNX teacher's actor never imports TensorFlow)
        self.task = task
        # (a teacher on an object store is fetched into this node's cache first)
        local = fetch_teacher(task.teacher.path, task.teacher_fingerprint if is_uri(task.teacher.path) else None)
        self.teacher = load_teacher(replace(task.teacher, path=local), task.pre, task.threads, task.gpus)
        self.storage = open_storage(task.out)
        self.schema = shard_schema(task.teacher.embedding_dim, task.dtype, task.flip, task.images, task.paths,
                                   views=task.views.count)
        self._rec = None
        if task.rec:
            from distill.embed.recordio import RecordIOReader

            self._rec = RecordIOReader(task.rec)
        self._decode = ThreadPoolExecutor(task.decode_threads, thread_name_prefix="decode")
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._compute = threading.Lock()  # one shard on the teacher at a time

    def ready(self) -> str:
        """What the teacher runs on here (the driver logs the first actor's)."""
        return self.teacher.runs_on

    # -- reading one row
    def _raw(self, path: str | None, offset: int) -> bytes:
        if offset >= 0:
            from distill.embed.recordio import RecordIOError, unpack

            try:
                _, image = unpack(self._rec.read_at(int(offset)))
            except RecordIOError as e:
                raise UnreadableImage(f"bad record: {e}") from None
            if not image:
                raise UnreadableImage("record holds no image bytes")
            return image
        return read_file(path)

    def _load_one(self, i: int, rows: ListingRows, x: np.ndarray, x_flip: np.ndarray | None,
                  x_views: np.ndarray | None, views: ViewParams | None, j: int):
        """Row i into slot j of the batch (and its mirror and views): read, decode, resize,
        render the views, preprocess.

        Runs on a decode thread and writes straight into the batch arrays, so nothing is
        left for the thread that feeds the teacher. Returns (stored bytes, error).
        """
        try:
            pixels, stored = prepare(self._raw(rows.path[i], int(rows.offset[i])), self.task.teacher.height, self.task.teacher.width)
        except UnreadableImage as e:
            where = rows.path[i] if rows.path[i] is not None else f"{self.task.rec}@{int(rows.offset[i])}"
            return None, RowError(int(rows.index[i]), where, e.reason)
        x[j] = self.teacher.pre.apply(pixels)
        if x_flip is not None:
            # Preprocessing is elementwise, so mirroring it equals preprocessing the mirror.
            x_flip[j] = x[j, :, ::-1]
        if x_views is not None:
            # The views of the stored pixels (what the student decodes), as distill.views renders them.
            k = x_views.shape[0]
            x_views[:, j] = self.teacher.pre.apply(render(np.broadcast_to(pixels, (k, *pixels.shape)), views.take(slice(j * k, (j + 1) * k))))
        return stored, None

    def _load_batch(self, rows: ListingRows, lo: int, hi: int) -> _Batch:
        """Rows [lo, hi) as one teacher batch (and its mirror), decoded and preprocessed.

        Runs on the prefetch thread, the per-image work on the decode threads, beside the
        teacher's call on the previous batch (PIL, NumPy and TF release the GIL).
        """
        spec = self.task.teacher
        x = np.empty((hi - lo, spec.height, spec.width, 3), np.float32)
        x_flip = np.empty_like(x) if self.task.flip else None
        k = self.task.views.count
        x_views = views = None
        if k:
            x_views = np.empty((k, *x.shape), np.float32)
            # Row-major (row, view): the views of row j are params j*k .. j*k+k-1.
            index = np.repeat(np.asarray(rows.index[lo:hi], np.int64), k)
            views = view_params(self.task.views, index, np.tile(np.arange(k), hi - lo), (spec.height, spec.width))
        loaded = list(self._decode.map(lambda j: self._load_one(lo + j, rows, x, x_flip, x_views, views, j), range(hi - lo)))
        keep = [j for j, (_, err) in enumerate(loaded) if err is None]
        errors = [err for _, err in loaded if err is not None]
        if len(keep) < len(loaded):  # rare: unreadable rows leave holes to close
            x = x[keep]
            x_flip = x_flip[keep] if x_flip is not None else None
            x_views = x_views[:, keep] if x_views is not None else None
        return _Batch(hi - lo, [lo + j for j in keep], [loaded[j][0] for j in keep], x, x_flip, x_views, errors)

    # -- one shard
    def embed_shard(self, shard: Shard, rows: ListingRows) -> Iterator[int | dict]:
        """Yield rows finished after each batch, then the shard's record once it is durable.

        The actor runs two of these at once (``max_concurrency=2``): the compute lock lets one
        shard use the teacher while the other encodes and writes its Parquet file.
        """
        t0 = time.perf_counter()
        spans = [(s - shard.start, e - shard.start) for s, e in batches(shard, self.task.batch_size)]
        keep: list[int] = []
        emb, emb_flip, emb_views, stored, errors = [], [], [], [], []
        with self._compute:
            pending = self._prefetch.submit(self._load_batch, rows, *spans[0]) if spans else None
            for b in range(len(spans)):
                batch = pending.result()
                # Decode and preprocess the next batch while the teacher runs this one.
                pending = self._prefetch.submit(self._load_batch, rows, *spans[b + 1]) if b + 1 < len(spans) else None
                errors.extend(batch.errors)
                if batch.keep:
                    emb.append(self.teacher.embed(batch.x))
                    if self.task.flip:
                        emb_flip.append(self.teacher.embed(batch.x_flip))
                    if batch.x_views is not None:
                        emb_views.append(np.stack([self.teacher.embed(v) for v in batch.x_views], axis=1))
                    keep.extend(batch.keep)
                    stored.extend(batch.stored)
                yield batch.rows
        dim = self.task.teacher.embedding_dim
        keep_idx = np.asarray(keep, dtype=np.int64)
        embedding = np.concatenate(emb) if emb else np.zeros((0, dim), np.float32)
        views = self.task.views.count
        data = encode_shard(
            self.schema,
            index=rows.index[keep_idx],
            label=rows.label[keep_idx],
            path=[rows.path[i] for i in keep] if self.task.paths else None,
            embedding=embedding,
            embedding_flip=(np.concatenate(emb_flip) if emb_flip else np.zeros((0, dim), np.float32)) if self.task.flip else None,
            embedding_views=(np.concatenate(emb_views) if emb_views else np.zeros((0, views, dim), np.float32)) if views else None,
            image=stored if self.task.images else None,
            run_id=self.task.run_id,
            k=shard.k,
            start=shard.start,
            stop=shard.stop,
            errors=errors,
        )
        self.storage.write_atomic(shard.name, data)
        yield ShardRecord(
            k=shard.k, rows=len(keep), bytes=len(data), sha256=sha256(data), errors=tuple(errors),
            seconds=time.perf_counter() - t0, finished_at=time.time(), norm=NormStats.of(embedding),
        ).to_json()


@dataclass
class _Batch:
    """One decoded, preprocessed teacher batch: listing positions kept, their stored bytes."""

    rows: int  # positions covered, kept or not
    keep: list[int]
    stored: list[bytes]
    x: np.ndarray | None
    x_flip: np.ndarray | None
    x_views: np.ndarray | None  # [K, n, H, W, 3]
    errors: list[RowError]


def _configure_tensorflow(threads: int | None) -> None:
    """Once per process, before the teacher loads: deterministic kernels, fixed threads.

    Same threads + same batches + deterministic ops -> the same floats on a rerun, which is
    what makes a resumed run byte-identical to an uninterrupted one.
    """
    import tensorflow as tf

    try:
        tf.config.experimental.enable_op_determinism()
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            # One inter-op thread: on small CPUs parallel ops oversubscribe the cores (2.4x slower here).
            tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # already initialised in this process (tests construct several workers)
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass
