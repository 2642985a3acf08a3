"""Streaming input for the student: a shard directory -> this worker's batches, resumable.

Owns the epoch order and the data cursor. The order is a pure function of (shard row
counts, seed, epoch, partitions, buffer size), and not of the worker count (``epoch_order``):

1. shuffle the shard order with a numpy Generator seeded from (seed, epoch) and lay their
   rows end to end (held-out rows left out);
2. cut that stream into P = ``--partitions`` contiguous parts and shuffle each with its own
   bounded buffer (its share of ``--shuffle-buffer``), simulated on sample ids only;
3. interleave the parts: element e of part p is global sample e * P + p;
4. global batch s is samples [s B, (s + 1) B); the last partial batch is dropped (a different
   one each epoch). Worker r of W (W dividing P and B) takes positions r::W of every batch,
   which all lie in parts p = r mod W, so it reads only those parts' shards.

The resume cursor is (epoch, samples consumed in the epoch, global), so a run saved with one
worker count goes on with any other that divides P at exactly the next sample. Resuming
recomputes the order and reads only the rows still to come: row groups with nothing left
are never opened.

Reading holds at most the shuffle buffer plus about one row group per part this worker reads,
whatever the number of shards; the order itself costs 8 bytes per sample of the epoch.
Hands on: a ``tf.data.Dataset`` of dicts ``image`` float32 [b, H, W, 3]
scaled ``(x - 127.5) / 128``, ``target`` (the teacher embedding of exactly those pixels,
``embedding_flip`` when the image was mirrored), ``label``, ``index``, ``flipped``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from distill.errors import BadInput, BadOption, IncompatibleRun, NoManifest
from distill.shards.format import ROW_GROUP_ROWS
from distill.views import ViewSpec

log = logging.getLogger(__name__)

# Tags keep the random streams of different decisions independent for one (seed, epoch).
_SHARD_ORDER, _BUFFER = 0, 1
_FLIP_SALT = 0x9E3779B97F4A7C15
PIXEL_MEAN, PIXEL_SCALE = 127.5, 128.0
# The epoch order's canonical partitions (``epoch_order``): any worker count dividing it can
# continue a run. 24 = 1, 2, 3, 4, 6, 8, 12 or 24 workers; a worker holds up to one row group
# per partition it reads beside the shuffle buffer.
DEFAULT_PARTITIONS = 24


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


def check_partitions(partitions: int, world_size: int) -> None:
    if partitions < 1:
        raise BadOption(f"--partitions must be >= 1, got {partitions}")
    if partitions % world_size:
        divisors = [d for d in range(1, partitions + 1) if partitions % d == 0]
        raise BadOption(
            f"{world_size} workers do not divide --partitions {partitions}: the epoch order is laid over "
            f"{partitions} canonical partitions, which the workers share out, so one run can continue with any "
            f"of {', '.join(map(str, divisors))} workers. Use one of those, or start a new --out with "
            f"--partitions a multiple of every worker count you will use (e.g. {world_size * partitions})"
        )


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


def partition_buffer(buffer: int, partitions: int) -> int:
    """Each partition's share of ``--shuffle-buffer`` (the buffer is the job's, over all partitions)."""
    return max(1, buffer // partitions)


def epoch_order(
    rows: Sequence[int], seed: int, epoch: int, partitions: int, buffer: int,
    exclude: np.ndarray | None = None, only: tuple[int, int] | None = None,
) -> np.ndarray:
    """The epoch's samples in global training order: a pure function of (shard row counts, seed,
    epoch, partitions, buffer, exclusions), the same whatever the number of workers.

    A sample id is the row's position in the manifest's shards laid end to end.

    1. the shards in an order shuffled from (seed, epoch), their rows laid end to end, the
       ``exclude``-d ones taken out: the epoch's stream of n samples;
    2. the stream cut into ``partitions`` contiguous parts of n // P or n // P + 1 samples;
    3. each part shuffled by its own bounded buffer (``partition_buffer``);
    4. interleaved: element e of part p is global sample e * P + p.

    Worker r of W (W dividing P) trains on global positions r, r + W, r + 2W, ...: only parts
    p = r mod W, so it reads only their shards. ``only=(r, W)`` computes just those parts and
    leaves the others' positions at -1.
    """
    r = np.asarray(rows, np.int64)
    offsets = np.concatenate([[0], np.cumsum(r)])
    shard_order = _rng(seed, epoch, _SHARD_ORDER).permutation(len(r))
    stream = (np.concatenate([np.arange(offsets[k], offsets[k + 1], dtype=np.int64) for k in shard_order])
              if len(r) else np.zeros(0, np.int64))
    if exclude is not None:
        stream = stream[~_mask(exclude, int(offsets[-1]))[stream]]
    n = len(stream)
    base, extra = divmod(n, partitions)
    starts = np.concatenate([[0], np.cumsum(base + (np.arange(partitions) < extra))])
    order = np.full(n, -1, np.int64)
    b = partition_buffer(buffer, partitions)
    for p in range(partitions):
        if only is not None and p % only[1] != only[0]:
            continue
        part = stream[starts[p]:starts[p + 1]]
        order[np.arange(len(part)) * partitions + p] = part[buffer_shuffle(len(part), b, _rng(seed, epoch, _BUFFER, p))]
    return order


def steps_per_epoch(train_samples: int, global_batch: int) -> int:
    """Global batches an epoch runs: the remainder (< one batch) is dropped, a different one each
    epoch since the order changes. The same for every worker count."""
    if global_batch <= 0:
        raise ValueError(f"the batch must be positive, got {global_batch}")
    return train_samples // global_batch


@dataclass(frozen=True)
class EpochPlan:
    """What one worker trains on in one epoch, from the cursor on."""

    epoch: int
    steps: int  # global batches per epoch, the same on every worker
    start_step: int  # first batch still to run
    shards: tuple[int, ...]  # the shards this worker reads, in the order it first needs them
    order: np.ndarray  # its sample ids still to train on, in order: (steps - start_step) * worker batch

    @property
    def remaining(self) -> int:
        return len(self.order)


def _mask(exclude: np.ndarray, total: int) -> np.ndarray:
    """The exclusion mask as bools, checked against the samples the shards hold."""
    if len(exclude) != total:
        raise ValueError(f"exclusion mask covers {len(exclude)} samples, the shards hold {total}")
    return np.asarray(exclude, bool)


def kept_rows(rows: Sequence[int], exclude: np.ndarray | None) -> list[int]:
    """Rows per shard left once the ``exclude`` mask (per sample id) is applied."""
    r = np.asarray(rows, np.int64)
    if exclude is None:
        return r.tolist()
    offsets = np.concatenate([[0], np.cumsum(r)])
    excluded = np.concatenate([[0], np.cumsum(_mask(exclude, int(offsets[-1])), dtype=np.int64)])
    return (r - (excluded[offsets[1:]] - excluded[offsets[:-1]])).tolist()


def plan_epoch(
    rows: Sequence[int], *, seed: int, epoch: int, world_size: int, rank: int, buffer: int,
    global_batch: int, partitions: int = DEFAULT_PARTITIONS, samples: int = 0, exclude: np.ndarray | None = None,
) -> EpochPlan:
    """The rest of an epoch for one worker, given the cursor ``samples`` (global, consumed). Pure.

    Global batch s is ``epoch_order[s * B : (s + 1) * B]`` whatever the worker count, and
    worker ``rank`` takes its positions ``rank::world_size`` of it, so a cursor saved with one
    worker count resumes with another (any divisor of ``partitions``) at exactly the next
    sample: nothing twice, nothing skipped. ``exclude`` (bool per sample id) takes rows out of
    training, e.g. the held-out validation identities: they are never read.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if global_batch % world_size:
        raise BadOption(f"--batch-size {global_batch} must be a multiple of the worker count {world_size}")
    check_partitions(partitions, world_size)
    rank_batch = global_batch // world_size
    steps = steps_per_epoch(sum(kept_rows(rows, exclude)), global_batch)
    if samples % global_batch or not 0 <= samples <= steps * global_batch:
        raise IncompatibleRun(
            f"cursor at sample {samples} of epoch {epoch} does not fall on a batch of {global_batch} within "
            f"{steps} steps; the checkpoint belongs to another configuration: use a new --out directory"
        )
    start = samples // global_batch
    order = epoch_order(rows, seed, epoch, partitions, buffer, exclude, only=(rank, world_size))
    order = order[rank::world_size][start * rank_batch: steps * rank_batch]
    offsets = np.concatenate([[0], np.cumsum(np.asarray(rows, np.int64))])
    shard_of = np.searchsorted(offsets, order, side="right") - 1
    _, first = np.unique(shard_of, return_index=True)
    return EpochPlan(epoch, steps, start, tuple(int(k) for k in shard_of[np.sort(first)]), order)


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

    Reads row groups in the order the plan first needs them (one per partition the worker
    reads is in use at a time), keeps only rows still to come, and emits each as soon as its
    turn arrives; a shard stays open while it has row groups to give. Row groups with nothing
    still to come, and shards with none, are never read. Each sample trains on one stored
    view (``distill.views.choose_views``, with probability ``view_prob`` when the shards
    hold views) or on the plain image, mirrored by ``flip_mask`` when ``flip``; ``target`` is
    the teacher's embedding of exactly that image (``embedding_views[v]``, ``embedding_flip``
    or ``embedding``), and the chunk carries the view's render parameters.
    """
    stats = stats if stats is not None else ReadStats()
    offsets = shards.offsets
    views = shards.views.count if (shards.views is not None and view_prob > 0) else 0
    columns = ["index", "label", "embedding", "image"] + (["embedding_flip"] if flip else []) + (
        ["embedding_views"] if views else [])
    files = _ShardFiles(shards, plan, stats)
    held: dict[int, tuple] = {}

    def row_groups() -> Iterator[None]:
        """Read row groups in order of first need, into ``held``."""
        for k, lo, hi, want in files.reads():
            _hold(held, files.read(k, lo, hi, columns), int(offsets[k]) + lo, want, shards.embedding_dim, flip, views)
            stats.peak_held = max(stats.peak_held, len(held))
            yield None

    reader = row_groups()
    out: list[tuple] = []
    emit = _Emitter(shards, seed, plan.epoch, flip, view_prob if views else 0.0)
    try:
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
    finally:
        files.close()


class _ShardFiles:
    """The plan's row groups in order of first need, and the open shard files they come from.

    A unit is ``ROW_GROUP_ROWS`` rows of a shard, the row groups ``distill embed`` writes; the
    file's own row-group sizes decide what is read for it, so other layouts read correctly.
    """

    def __init__(self, shards: ShardSet, plan: EpochPlan, stats: ReadStats):
        from distill.shards.storage import open_storage

        self.shards, self.stats = shards, stats
        self.storage = open_storage(shards.location, create=False)
        self.offsets = shards.offsets
        self.needed = np.zeros(int(self.offsets[-1]), bool)
        self.needed[plan.order] = True
        k = np.searchsorted(self.offsets, plan.order, side="right") - 1
        key = (k << 32) | ((plan.order - self.offsets[k]) // ROW_GROUP_ROWS)
        _, first = np.unique(key, return_index=True)
        self.units = key[np.sort(first)]  # in order of first need
        self.left = dict(zip(*np.unique(self.units >> 32, return_counts=True)))  # shard -> units still to read
        self.open: dict[int, tuple] = {}  # shard -> (file, ParquetFile, row-group starts)
        stats.shards_skipped += len(shards.rows) - len(self.left)
        for kk, n in self.left.items():
            stats.row_groups_skipped += -(-int(shards.rows[kk]) // ROW_GROUP_ROWS) - int(n)

    def reads(self) -> Iterator[tuple[int, int, int, np.ndarray]]:
        """(shard, first row, last row + 1, wanted rows as offsets from the first), in order of first need."""
        for key in self.units.tolist():
            k, u = key >> 32, key & 0xFFFFFFFF
            lo, hi = u * ROW_GROUP_ROWS, min((u + 1) * ROW_GROUP_ROWS, int(self.shards.rows[k]))
            base = int(self.offsets[k])
            yield k, lo, hi, np.flatnonzero(self.needed[base + lo:base + hi])

    def read(self, k: int, lo: int, hi: int, columns: list[str]):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if k not in self.open:
            f = self.storage.open_input(self.shards.names[k])
            pf = pq.ParquetFile(f)
            if pf.metadata.num_rows != self.shards.rows[k]:
                f.close()
                raise BadInput(
                    f"{self.storage.uri(self.shards.names[k])} has {pf.metadata.num_rows} rows but the manifest says "
                    f"{self.shards.rows[k]}; the shard directory was modified after embedding: rerun `distill embed`"
                )
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            self.open[k] = (f, pf, np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]))
        f, pf, starts = self.open[k]
        g0 = int(np.searchsorted(starts, lo, side="right") - 1)
        g1 = int(np.searchsorted(starts, hi, side="left"))
        self.stats.row_groups_read += 1
        tables = [pf.read_row_group(g, columns=columns) for g in range(g0, g1)]
        table = (tables[0] if len(tables) == 1 else pa.concat_tables(tables)).slice(lo - int(starts[g0]), hi - lo)
        self.left[k] -= 1
        if not self.left[k]:
            f.close()
            del self.open[k]
        return table

    def close(self) -> None:
        for f, *_ in self.open.values():
            f.close()
        self.open.clear()


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
