"""Streaming input for the student: a shard directory -> this rank's batches, resumable.

Owns the epoch order and the data cursor. The order is a pure function of (shard row
counts, seed, epoch, world size, rank, buffer size):

1. shuffle the shard order with a numpy Generator seeded from (seed, epoch);
2. rank r takes the shuffled shards at positions r, r+W, r+2W, ...;
3. a bounded shuffle buffer (classic: fill, then emit a random slot and refill it) runs over
   the rank's rows, simulated on (shard, row) ids only, so no pixel is touched to know it;
4. every rank stops after the same number of batches: ``min over ranks of rows // batch``.
   The remainder of the epoch is dropped (a different one each epoch, since shard order
   changes), so no rank waits at a collective for a batch that never comes.

The resume cursor is (epoch, samples consumed in the epoch, global). Resuming recomputes the
order and reads only the rows still to come: row groups with nothing left are never opened.

Reading holds at most the shuffle buffer plus one row group of rows (the emit order came
from a buffer of that size), whatever the number of shards; the order itself costs 8 bytes
per row of this rank. Hands on: a ``tf.data.Dataset`` of dicts ``image`` float32 [b, H, W, 3]
scaled ``(x - 127.5) / 128``, ``target`` (the teacher embedding of exactly those pixels,
``embedding_flip`` when the image was mirrored), ``label``, ``index``, ``flipped``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

# Tags keep the random streams of different decisions independent for one (seed, epoch).
_SHARD_ORDER, _BUFFER = 0, 1
_FLIP_SALT = 0x9E3779B97F4A7C15
PIXEL_MEAN, PIXEL_SCALE = 127.5, 128.0


@dataclass(frozen=True)
class ShardSet:
    """What the trainer needs from a shard directory's manifest."""

    location: str
    run_id: str
    names: tuple[str, ...]
    rows: tuple[int, ...]
    embedding_dim: int
    num_classes: int
    input_size: tuple[int, int]
    flip: bool
    dtype: str

    @property
    def total_rows(self) -> int:
        return sum(self.rows)


def shard_set(location: str, manifest: dict) -> ShardSet:
    """Check a manifest can be trained on, and keep what the trainer needs. Pure."""
    if not manifest.get("images", False):
        raise ValueError(
            f"the shards in {location} hold no images (embedded with --no-images); the student trains on "
            "pixels, so rerun `distill embed` without --no-images into a new --out directory"
        )
    if not manifest.get("complete", False):
        missing = int(manifest.get("num_shards", 0)) - len(manifest.get("shards", ()))
        raise ValueError(
            f"the shards in {location} are incomplete: {missing} of {manifest.get('num_shards')} shards are "
            "missing. Finish `distill embed` first (rerun the same embed command; it resumes)"
        )
    shards = sorted(manifest["shards"], key=lambda s: s["k"])
    if not shards or sum(s["rows"] for s in shards) == 0:
        raise ValueError(f"the shards in {location} hold no rows; check the listing given to `distill embed`")
    h, w = manifest["input_size"]
    return ShardSet(
        location=location,
        run_id=manifest["run_id"],
        names=tuple(s["name"] for s in shards),
        rows=tuple(int(s["rows"]) for s in shards),
        embedding_dim=int(manifest["embedding_dim"]),
        num_classes=int(manifest["num_classes"]),
        input_size=(int(h), int(w)),
        flip=bool(manifest.get("flip", False)),
        dtype=manifest.get("dtype", "float32"),
    )


def open_shards(location: str) -> ShardSet:
    from shards.manifest import load_manifest

    try:
        manifest = load_manifest(location)
    except FileNotFoundError as e:
        if "distill embed" in str(e):
            raise
        raise FileNotFoundError(f"{e}: pass the shard directory written by `distill embed ... --out DIR`") from None
    return shard_set(location, manifest)


# ---------------------------------------------------------------- the order (pure)


def _rng(seed: int, epoch: int, *tags: int) -> np.random.Generator:
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, *tags])))


def rank_shards(num_shards: int, seed: int, epoch: int, world_size: int, rank: int) -> np.ndarray:
    """Positions (into the manifest's shard list) this rank reads this epoch, in order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    order = _rng(seed, epoch, _SHARD_ORDER).permutation(num_shards)
    return order[rank::world_size]


def rank_rows(rows: Sequence[int], seed: int, epoch: int, world_size: int) -> list[int]:
    """Rows each rank holds this epoch (before the drop to whole batches)."""
    r = np.asarray(rows, np.int64)
    return [int(r[rank_shards(len(r), seed, epoch, world_size, k)].sum()) for k in range(world_size)]


def steps_per_epoch(rows: Sequence[int], seed: int, epoch: int, world_size: int, rank_batch: int) -> int:
    """Batches every rank runs this epoch: the smallest rank's whole batches."""
    if rank_batch <= 0:
        raise ValueError(f"the per-worker batch must be positive, got {rank_batch}")
    return min(n // rank_batch for n in rank_rows(rows, seed, epoch, world_size))


def buffer_shuffle(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Emit order of a bounded shuffle buffer over a stream 0..n-1.

    Fill ``buffer`` slots; for each further item emit a random slot and put the item there;
    at the end emit what is left in random order. Item ``buffer + i`` arrives as emission i
    leaves, so a reader following this order never holds more than ``buffer`` items.
    """
    size = min(max(buffer, 1), n)
    if size <= 1:
        return np.arange(n, dtype=np.int64)
    slots = list(range(size))
    picks = rng.integers(0, size, size=n - size).tolist()
    out = []
    emit = out.append
    for i, p in enumerate(picks):
        emit(slots[p])
        slots[p] = size + i
    tail = rng.permutation(size)
    return np.concatenate([np.asarray(out, np.int64), np.asarray(slots, np.int64)[tail]])


def epoch_order(rows: Sequence[int], seed: int, epoch: int, world_size: int, rank: int, buffer: int) -> np.ndarray:
    """Every row this rank holds this epoch, as global sample ids, in the order it trains on them.

    A sample id is the row's position in the manifest's shards laid end to end.
    """
    r = np.asarray(rows, np.int64)
    offsets = np.concatenate([[0], np.cumsum(r)])
    mine = rank_shards(len(r), seed, epoch, world_size, rank)
    stream = (
        np.concatenate([np.arange(offsets[k], offsets[k + 1], dtype=np.int64) for k in mine])
        if len(mine) else np.zeros(0, np.int64)
    )
    return stream[buffer_shuffle(len(stream), buffer, _rng(seed, epoch, _BUFFER, rank))]


@dataclass(frozen=True)
class EpochPlan:
    """What one rank trains on in one epoch, from the cursor on."""

    epoch: int
    steps: int  # batches per epoch, the same on every rank
    start_step: int  # first batch still to run
    shards: tuple[int, ...]  # this rank's shard positions, in stream order
    order: np.ndarray  # the sample ids still to train on, in order: (steps - start_step) * rank_batch

    @property
    def remaining(self) -> int:
        return len(self.order)


def plan_epoch(
    rows: Sequence[int], *, seed: int, epoch: int, world_size: int, rank: int, buffer: int,
    global_batch: int, samples: int = 0,
) -> EpochPlan:
    """The rest of an epoch for one rank, given the cursor ``samples`` (global, consumed). Pure."""
    if global_batch % world_size:
        raise ValueError(f"--batch-size {global_batch} must be a multiple of the worker count {world_size}")
    rank_batch = global_batch // world_size
    steps = steps_per_epoch(rows, seed, epoch, world_size, rank_batch)
    if samples % global_batch or not 0 <= samples <= steps * global_batch:
        raise ValueError(
            f"cursor at sample {samples} of epoch {epoch} does not fall on a batch of {global_batch} within "
            f"{steps} steps; the checkpoint belongs to another configuration: use a new --out directory"
        )
    start = samples // global_batch
    order = epoch_order(rows, seed, epoch, world_size, rank, buffer)[start * rank_batch: steps * rank_batch]
    return EpochPlan(epoch, steps, start, tuple(int(k) for k in rank_shards(len(rows), seed, epoch, world_size, rank)), order)


def flip_mask(seed: int, epoch: int, index: np.ndarray) -> np.ndarray:
    """Whether each sample is mirrored this epoch: a pure hash of (seed, epoch, listing index).

    splitmix64 finaliser; numpy uint64 arithmetic wraps, which is the point.
    """
    x = np.asarray(index, np.uint64) * np.uint64(_FLIP_SALT)
    x ^= np.uint64((seed * 0xBF58476D1CE4E5B9 + epoch * 0x94D049BB133111EB + 1) & 0xFFFFFFFFFFFFFFFF)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(63)).astype(bool)


# ---------------------------------------------------------------- reading (pyarrow only)


@dataclass
class ReadStats:
    """What the reader did; the tests check memory stays bounded by the buffer."""

    row_groups_read: int = 0
    row_groups_skipped: int = 0
    shards_skipped: int = 0  # nothing left to read in them: never opened
    peak_held: int = 0


def iter_samples(
    shards: ShardSet, plan: EpochPlan, *, seed: int, flip: bool, chunk: int = 256,
    stats: ReadStats | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The plan's samples in order, as chunks of numpy arrays (no TensorFlow here).

    Reads this rank's shards front to back, row group by row group, keeping only rows still
    to come, and emits each as soon as its turn arrives. ``target`` is ``embedding_flip`` for
    mirrored samples and ``embedding`` otherwise; ``flipped`` says which.
    """
    import pyarrow.parquet as pq

    from shards.storage import open_storage

    stats = stats if stats is not None else ReadStats()
    storage = open_storage(shards.location, create=False)
    offsets = np.concatenate([[0], np.cumsum(np.asarray(shards.rows, np.int64))])
    needed = np.zeros(int(offsets[-1]), bool)
    needed[plan.order] = True
    columns = ["index", "label", "embedding", "image"] + (["embedding_flip"] if flip else [])
    held: dict[int, tuple] = {}

    def row_groups() -> Iterator[None]:
        """Read the stream forward one row group at a time, into ``held``."""
        for k in plan.shards:
            lo, hi = int(offsets[k]), int(offsets[k + 1])
            if not needed[lo:hi].any():
                stats.shards_skipped += 1
                continue
            with storage.open_input(shards.names[k]) as f:
                pf = pq.ParquetFile(f)
                if pf.metadata.num_rows != hi - lo:
                    raise ValueError(
                        f"{storage.uri(shards.names[k])} has {pf.metadata.num_rows} rows but the manifest says "
                        f"{hi - lo}; the shard directory was modified after embedding: rerun `distill embed`"
                    )
                start = lo
                for g in range(pf.num_row_groups):
                    n = pf.metadata.row_group(g).num_rows
                    want = np.flatnonzero(needed[start:start + n])
                    if len(want) == 0:
                        stats.row_groups_skipped += 1
                    else:
                        stats.row_groups_read += 1
                        _hold(held, pf.read_row_group(g, columns=columns), start, want, shards.embedding_dim, flip)
                        stats.peak_held = max(stats.peak_held, len(held))
                        yield None
                    start += n

    reader = row_groups()
    out: list[tuple] = []
    for sid in plan.order.tolist():
        while sid not in held:
            if next(reader, StopIteration) is StopIteration:
                raise ValueError(f"sample {sid} of the plan is not in the shards of {shards.location}; the shards changed")
        out.append(held.pop(sid))
        if len(out) == chunk:
            yield _chunk(out, seed, plan.epoch, flip)
            out = []
    if out:
        yield _chunk(out, seed, plan.epoch, flip)


def _hold(held: dict, table, start: int, want: np.ndarray, dim: int, flip: bool) -> None:
    t = table.take(want)  # only the rows still to come are copied out of Arrow
    index = t.column("index").to_numpy()
    label = t.column("label").to_numpy()
    image = t.column("image").to_pylist()
    emb = _embeddings(t.column("embedding"), dim)
    emb_flip = _embeddings(t.column("embedding_flip"), dim) if flip else emb
    for j, i in enumerate(want.tolist()):
        held[start + i] = (index[j], label[j], image[j], emb[j], emb_flip[j])


def _embeddings(column, dim: int) -> np.ndarray:
    arr = column.combine_chunks()
    return arr.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def _chunk(rows: list[tuple], seed: int, epoch: int, flip: bool) -> dict[str, np.ndarray]:
    index = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    flipped = flip_mask(seed, epoch, index) if flip else np.zeros(len(rows), bool)
    emb = np.stack([r[3] for r in rows])
    emb_flip = np.stack([r[4] for r in rows])
    return {
        "image": np.array([r[2] for r in rows], dtype=object),
        "target": choose_target(emb, emb_flip, flipped),
        "label": np.fromiter((r[1] for r in rows), np.int64, len(rows)),
        "index": index,
        "flipped": flipped,
    }


def choose_target(embedding: np.ndarray, embedding_flip: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """The teacher's embedding of the pixels the student actually sees."""
    return np.where(np.asarray(flipped, bool)[:, None], embedding_flip, embedding).astype(np.float32)


def resolve_flip(shards: ShardSet, want: bool) -> bool:
    """Flip only when the shards hold the mirrored target; say so when they do not."""
    if want and not shards.flip:
        log.warning(
            "random flip disabled: the shards in %s have no embedding_flip (embedded with --no-flip), and a "
            "mirrored image trained towards the unmirrored embedding is the wrong target. Re-embed with flip "
            "on to use it, or pass --no-flip to silence this.", shards.location,
        )
        return False
    return want


# ---------------------------------------------------------------- TensorFlow


def make_dataset(shards: ShardSet, plan: EpochPlan, *, seed: int, flip: bool, replica_batch: int, chunk: int = 256):
    """The plan as batches of ``replica_batch`` decoded, mirrored-or-not, scaled images."""
    import tensorflow as tf

    h, w = shards.input_size
    d = shards.embedding_dim
    signature = {
        "image": tf.TensorSpec([None], tf.string),
        "target": tf.TensorSpec([None, d], tf.float32),
        "label": tf.TensorSpec([None], tf.int64),
        "index": tf.TensorSpec([None], tf.int64),
        "flipped": tf.TensorSpec([None], tf.bool),
    }

    def chunks():
        yield from iter_samples(shards, plan, seed=seed, flip=flip, chunk=chunk)

    def decode(s):
        x = tf.io.decode_image(s["image"], channels=3, expand_animations=False)
        x = tf.ensure_shape(x, [h, w, 3])  # the manifest's input_size: anything else is a broken shard
        x = tf.cond(s["flipped"], lambda: tf.image.flip_left_right(x), lambda: x)
        return {**s, "image": (tf.cast(x, tf.float32) - PIXEL_MEAN) / PIXEL_SCALE}

    ds = tf.data.Dataset.from_generator(chunks, output_signature=signature).unbatch()
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(replica_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
