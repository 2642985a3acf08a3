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

from distill.errors import BadInput, BadOption, IncompatibleRun, NoManifest
from distill.views import ViewSpec

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
    views: ViewSpec | None = None  # the stored views' parameters (None: no views stored)
    teacher: dict | None = None  # path, signature, output and preprocessing the embed run used
    teacher_norm: dict | None = None  # raw teacher norms: rows, mean, std, min, max

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    @property
    def offsets(self) -> np.ndarray:
        """Sample id of each shard's first row (shards laid end to end), and the total."""
        return np.concatenate([[0], np.cumsum(np.asarray(self.rows, np.int64))])


def shard_set(location: str, manifest: dict) -> ShardSet:
    """Check a manifest can be trained on, and keep what the trainer needs. Pure."""
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
    shards = sorted(manifest["shards"], key=lambda s: s["k"])
    if not shards or sum(s["rows"] for s in shards) == 0:
        raise BadInput(f"the shards in {location} hold no rows; check the listing given to `distill embed`")
    h, w = manifest["input_size"]
    views = manifest.get("views")
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
        views=ViewSpec.from_json(views) if views else None,
        teacher={"path": manifest.get("teacher"), "signature": manifest.get("teacher_signature"),
                 "preprocessing": manifest.get("preprocessing")},
        teacher_norm=manifest.get("teacher_norm"),
    )


def open_shards(location: str) -> ShardSet:
    from distill.shards.manifest import load_manifest

    try:
        manifest = load_manifest(location)
    except NoManifest:
        raise
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}: pass the shard directory written by `distill embed ... --out DIR`") from None
    return shard_set(location, manifest)


# ---------------------------------------------------------------- the order (pure)


def _rng(seed: int, epoch: int, *tags: int) -> np.random.Generator:
    if seed < 0:
        raise BadOption(f"--seed must be >= 0, got {seed}")
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


def kept_rows(rows: Sequence[int], exclude: np.ndarray | None) -> list[int]:
    """Rows per shard left once the ``exclude`` mask (per sample id) is applied."""
    r = np.asarray(rows, np.int64)
    if exclude is None:
        return r.tolist()
    offsets = np.concatenate([[0], np.cumsum(r)])
    if len(exclude) != offsets[-1]:
        raise ValueError(f"exclusion mask covers {len(exclude)} samples, the shards hold {offsets[-1]}")
    excluded = np.concatenate([[0], np.cumsum(np.asarray(exclude, np.int64))])
    return (r - (excluded[offsets[1:]] - excluded[offsets[:-1]])).tolist()


def plan_epoch(
    rows: Sequence[int], *, seed: int, epoch: int, world_size: int, rank: int, buffer: int,
    global_batch: int, samples: int = 0, exclude: np.ndarray | None = None,
) -> EpochPlan:
    """The rest of an epoch for one rank, given the cursor ``samples`` (global, consumed). Pure.

    ``exclude`` (bool per sample id) takes rows out of training, e.g. the held-out
    validation identities: they are dropped from the order, never read.
    """
    if global_batch % world_size:
        raise BadOption(f"--batch-size {global_batch} must be a multiple of the worker count {world_size}")
    rank_batch = global_batch // world_size
    steps = steps_per_epoch(kept_rows(rows, exclude), seed, epoch, world_size, rank_batch)
    if samples % global_batch or not 0 <= samples <= steps * global_batch:
        raise IncompatibleRun(
            f"cursor at sample {samples} of epoch {epoch} does not fall on a batch of {global_batch} within "
            f"{steps} steps; the checkpoint belongs to another configuration: use a new --out directory"
        )
    start = samples // global_batch
    order = epoch_order(rows, seed, epoch, world_size, rank, buffer)
    if exclude is not None:
        order = order[~np.asarray(exclude, bool)[order]]
    order = order[start * rank_batch: steps * rank_batch]
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
    shards: ShardSet, plan: EpochPlan, *, seed: int, flip: bool, view_prob: float = 0.0, chunk: int = 256,
    stats: ReadStats | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The plan's samples in order, as chunks of numpy arrays (no TensorFlow here).

    Reads this rank's shards front to back, row group by row group, keeping only rows still
    to come, and emits each as soon as its turn arrives. Each sample trains on one stored
    view (``distill.views.choose_views``, with probability ``view_prob`` when the shards
    hold views) or on the plain image, mirrored by ``flip_mask`` when ``flip``; ``target`` is
    the teacher's embedding of exactly that image (``embedding_views[v]``, ``embedding_flip``
    or ``embedding``), and the chunk carries the view's render parameters.
    """
    import pyarrow.parquet as pq

    from distill.shards.storage import open_storage

    stats = stats if stats is not None else ReadStats()
    storage = open_storage(shards.location, create=False)
    offsets = shards.offsets
    needed = np.zeros(int(offsets[-1]), bool)
    needed[plan.order] = True
    views = shards.views.count if (shards.views is not None and view_prob > 0) else 0
    columns = ["index", "label", "embedding", "image"] + (["embedding_flip"] if flip else []) + (
        ["embedding_views"] if views else [])
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
                    raise BadInput(
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
                        _hold(held, pf.read_row_group(g, columns=columns), start, want, shards.embedding_dim, flip, views)
                        stats.peak_held = max(stats.peak_held, len(held))
                        yield None
                    start += n

    reader = row_groups()
    out: list[tuple] = []
    emit = _Emitter(shards, seed, plan.epoch, flip, view_prob if views else 0.0)
    for sid in plan.order.tolist():
        while sid not in held:
            if next(reader, StopIteration) is StopIteration:
                raise BadInput(f"sample {sid} of the plan is not in the shards of {shards.location}; the shards changed")
        out.append(held.pop(sid))
        if len(out) == chunk:
            yield emit(out)
            out = []
    if out:
        yield emit(out)


def _hold(held: dict, table, start: int, want: np.ndarray, dim: int, flip: bool, views: int) -> None:
    t = table.take(want)  # only the rows still to come are copied out of Arrow
    index = t.column("index").to_numpy()
    label = t.column("label").to_numpy()
    image = t.column("image").to_pylist()
    emb = _embeddings(t.column("embedding"), dim)
    emb_flip = _embeddings(t.column("embedding_flip"), dim) if flip else emb
    emb_views = _embeddings(t.column("embedding_views"), dim, views) if views else [None] * len(want)
    for j, i in enumerate(want.tolist()):
        held[start + i] = (index[j], label[j], image[j], emb[j], emb_flip[j], emb_views[j])


def _embeddings(column, dim: int, views: int = 0) -> np.ndarray:
    arr = column.combine_chunks()
    values = arr.values.values if views else arr.values
    shape = (-1, views, dim) if views else (-1, dim)
    return values.to_numpy(zero_copy_only=False).reshape(shape).astype(np.float32, copy=False)


class _Emitter:
    """Held rows -> one chunk: what each sample trains on this epoch, and its target."""

    def __init__(self, shards: ShardSet, seed: int, epoch: int, flip: bool, view_prob: float):
        self.size = shards.input_size
        self.spec = shards.views
        self.seed, self.epoch, self.flip, self.view_prob = seed, epoch, flip, view_prob

    def __call__(self, rows: list[tuple]) -> dict[str, np.ndarray]:
        from distill.views import choose_views, plain_params, view_params

        n = len(rows)
        index = np.fromiter((r[0] for r in rows), np.int64, n)
        flipped = flip_mask(self.seed, self.epoch, index) if self.flip else np.zeros(n, bool)
        target = choose_target(np.stack([r[3] for r in rows]), np.stack([r[4] for r in rows]), flipped)
        view = choose_views(self.seed, self.epoch, index, self.spec.count if self.spec else 0, self.view_prob)
        params = plain_params(flipped, self.size)
        on = np.flatnonzero(view >= 0)
        if len(on):
            vp = view_params(self.spec, index[on], view[on], self.size)
            for f in ("box", "mirror", "brightness", "contrast", "saturation", "grey"):
                getattr(params, f)[on] = getattr(vp, f)
            target[on] = np.stack([rows[j][5][view[j]] for j in on.tolist()])
        return {
            "image": np.array([r[2] for r in rows], dtype=object),
            "target": target,
            "label": np.fromiter((r[1] for r in rows), np.int64, n),
            "index": index,
            "flipped": params.mirror,
            "view": view,
            "box": params.box,
            "brightness": params.brightness,
            "contrast": params.contrast,
            "saturation": params.saturation,
            "grey": params.grey,
        }


def choose_target(embedding: np.ndarray, embedding_flip: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """The teacher's embedding of the pixels the student actually sees (plain or mirrored)."""
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


def decode_stored(data):
    """A shard's stored image bytes -> uint8 [H, W, 3], the pixels the teacher saw.

    The teacher side decodes with PIL (libjpeg's accurate integer DCT); TensorFlow's default
    JPEG decode uses the fast DCT and differs by up to ~20 levels, so JPEGs are decoded with
    ``INTEGER_ACCURATE``, which matches PIL bit for bit. Shards store only JPEG (the original
    bytes) or PNG (converted, lossless).
    """
    import tensorflow as tf

    return tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_png(data, channels=3),
    )


def _render_batch(images, box, mirror, brightness, contrast, saturation, grey):
    from distill.views import ViewParams, render

    return render(images, ViewParams(box, mirror, brightness, contrast, saturation, grey))


def make_dataset(
    shards: ShardSet, plan: EpochPlan, *, seed: int, flip: bool, replica_batch: int, view_prob: float = 0.0,
    chunk: int = 256, scale: bool = True,
):
    """The plan as batches of ``replica_batch`` decoded, viewed (or mirrored), scaled images.

    With views, each batch is rendered by ``distill.views.render`` (NumPy, the function the
    embed actor used), so the student sees the teacher's exact pixels. ``scale=False`` keeps
    uint8 pixels (the tests compare them with the teacher's).
    """
    import tensorflow as tf

    h, w = shards.input_size
    d = shards.embedding_dim
    signature = {
        "image": tf.TensorSpec([None], tf.string),
        "target": tf.TensorSpec([None, d], tf.float32),
        "label": tf.TensorSpec([None], tf.int64),
        "index": tf.TensorSpec([None], tf.int64),
        "flipped": tf.TensorSpec([None], tf.bool),
        "view": tf.TensorSpec([None], tf.int64),
        "box": tf.TensorSpec([None, 4], tf.float64),
        "brightness": tf.TensorSpec([None], tf.float32),
        "contrast": tf.TensorSpec([None], tf.float32),
        "saturation": tf.TensorSpec([None], tf.float32),
        "grey": tf.TensorSpec([None], tf.bool),
    }
    views = shards.views is not None and view_prob > 0

    def chunks():
        yield from iter_samples(shards, plan, seed=seed, flip=flip, view_prob=view_prob if views else 0.0, chunk=chunk)

    def decode(s):
        x = tf.ensure_shape(decode_stored(s["image"]), [h, w, 3])  # the manifest's input_size: anything else is a broken shard
        if not views:
            x = tf.cond(s["flipped"], lambda: tf.image.flip_left_right(x), lambda: x)
        return {**s, "image": x}

    def render(b):
        x = tf.numpy_function(_render_batch, [b["image"], b["box"], b["flipped"], b["brightness"], b["contrast"],
                                              b["saturation"], b["grey"]], tf.uint8, stateful=False)
        return {**b, "image": tf.ensure_shape(x, [replica_batch, h, w, 3])}

    def finish(b):
        b = {k: v for k, v in b.items() if k not in ("box", "brightness", "contrast", "saturation", "grey")}
        if scale:
            b["image"] = (tf.cast(b["image"], tf.float32) - PIXEL_MEAN) / PIXEL_SCALE
        return b

    ds = tf.data.Dataset.from_generator(chunks, output_signature=signature).unbatch()
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(replica_batch, drop_remainder=True)
    if views:
        ds = ds.map(render, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)
