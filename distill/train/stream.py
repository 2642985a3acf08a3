"""Streaming input for the student: a shard directory -> this worker's batches, resumable.

Reads what ``distill.train.order`` decides (the epoch's samples for this worker, from the
cursor on) through the shard reader (``distill.shards.reader``): row groups in the order the
plan first needs them, only the rows still to come (row groups with nothing left are never
opened), each sample emitted as soon as its turn arrives. Reading holds at most the shuffle
buffer plus about one row group per part this worker reads, whatever the number of shards.

Hands on: a ``tf.data.Dataset`` of dicts ``image`` uint8 [b, H, W, 3] (the student scales its
own pixels), ``target`` (the teacher embedding of exactly those pixels,
``embedding_flip`` when the image was mirrored, or the stored view's), ``label``, ``index``,
``flipped``, ``view``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from distill.errors import BadInput
from distill.shards.format import ROW_GROUP_ROWS
from distill.shards.reader import ShardSet
from distill.train.order import EpochPlan, choose_target, flip_mask

log = logging.getLogger(__name__)

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
    views = shards.views["count"] if (shards.views is not None and view_prob > 0) else 0
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
        from distill.shards.reader import ShardReader

        self.shards, self.stats = shards, stats
        self.reader = ShardReader(shards)
        self.offsets = shards.offsets
        self.needed = np.zeros(int(self.offsets[-1]), bool)
        self.needed[plan.order] = True
        k = np.searchsorted(self.offsets, plan.order, side="right") - 1
        key = (k << 32) | ((plan.order - self.offsets[k]) // ROW_GROUP_ROWS)
        _, first = np.unique(key, return_index=True)
        self.units = key[np.sort(first)]  # in order of first need
        self.left = dict(zip(*np.unique(self.units >> 32, return_counts=True)))  # shard -> units still to read
        self.open: dict[int, object] = {}  # shard -> its open ShardFile
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
        if k not in self.open:
            self.open[k] = self.reader.open(k)
        self.stats.row_groups_read += 1
        table = self.open[k].read(lo, hi, columns)
        self.left[k] -= 1
        if not self.left[k]:
            self.open.pop(k).close()
        return table

    def close(self) -> None:
        for f in self.open.values():
            f.close()
        self.open.clear()


def _hold(held: dict, table, start: int, want: np.ndarray, dim: int, flip: bool, views: int) -> None:
    from distill.shards.reader import embeddings

    t = table.take(want)  # only the rows still to come are copied out of Arrow
    index = t.column("index").to_numpy()
    label = t.column("label").to_numpy()
    image = t.column("image").to_pylist()
    emb = embeddings(t.column("embedding"), dim)
    emb_flip = embeddings(t.column("embedding_flip"), dim) if flip else emb
    emb_views = embeddings(t.column("embedding_views"), dim, views) if views else [None] * len(want)
    for j, i in enumerate(want.tolist()):
        held[start + i] = (index[j], label[j], image[j], emb[j], emb_flip[j], emb_views[j])


class _Emitter:
    """Held rows -> one chunk: what each sample trains on this epoch, and its target."""

    def __init__(self, shards: ShardSet, seed: int, epoch: int, flip: bool, view_prob: float):
        from distill.views import ViewSpec

        self.size = shards.input_size
        self.spec = ViewSpec.from_json(shards.views) if shards.views else None
        self.seed, self.epoch, self.flip, self.view_prob = seed, epoch, flip, view_prob

    def __call__(self, rows: list[tuple]) -> dict[str, np.ndarray]:
        from distill.views import choose_views, plain_params, taps, view_params

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
            **asdict(taps(params.box, self.size)),
            "brightness": params.brightness,
            "contrast": params.contrast,
            "saturation": params.saturation,
            "grey": params.grey,
        }


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


def check_decoder(shards: ShardSet, n: int = 8) -> None:
    """The student's decoder must give the teacher's pixels: on the first ``n`` stored images
    TensorFlow's decode (``decode_stored``) against Pillow's (what the teacher saw). A library
    version whose decoder differs is refused before training, naming both versions."""
    import numpy as np
    import tensorflow as tf

    from distill.images import decode_rgb
    from distill.shards.reader import ShardReader
    from distill.startup import versions

    table = ShardReader(shards).first(n, ["index", "image"])
    for index, data in zip(table.column("index").to_pylist(), table.column("image").to_pylist()):
        if not np.array_equal(decode_stored(tf.constant(data)).numpy(), decode_rgb(data)):
            v = versions()
            raise BadInput(
                f"TensorFlow {v['tensorflow']} decodes the stored image of listing row {index} differently from "
                f"Pillow {v['pillow']}, which decoded what the teacher saw: the student would train on other pixels "
                "than its targets'. Install the TensorFlow and Pillow versions the shards were made with (their "
                f"manifest's `versions` in {shards.location}), or re-embed with these")


def _chunk_source(chunks, signature: dict):
    """The chunks of the Python generator ``chunks()`` as a tf.data source, in order, ending
    with the generator. Iterate it once (``make_dataset`` makes one per epoch).

    Not ``tf.data.Dataset.from_generator``: once one has run, every later step of the student
    in the process ran 3x slower here (the step's memory page-faulted afresh each time: 15x the
    minor faults, 10x the system time; docs/BENCHMARKS.md). A ``numpy_function`` that hands
    over the next chunk, repeated until an empty one, reads the same chunks without it."""
    import numpy as np
    import tensorflow as tf

    keys = list(signature)
    state: dict = {}

    def next_chunk():
        if "it" not in state:
            state["it"] = iter(chunks())
        chunk = next(state["it"], None)
        if chunk is None:  # the end: an empty chunk of the right shapes and types
            return [np.zeros([0, *signature[k].shape[1:]], signature[k].dtype.as_numpy_dtype) for k in keys]
        return [np.asarray(chunk[k], signature[k].dtype.as_numpy_dtype) for k in keys]

    def fetch(_):
        values = tf.numpy_function(next_chunk, [], [signature[k].dtype for k in keys], stateful=True)
        return {k: tf.ensure_shape(v, signature[k].shape) for k, v in zip(keys, values)}

    ds = tf.data.Dataset.from_tensors(0).repeat(None).map(fetch)
    return ds.take_while(lambda c: tf.shape(c[keys[0]])[0] > 0)


def make_dataset(
    shards: ShardSet, plan: EpochPlan, *, seed: int, flip: bool, replica_batch: int, view_prob: float = 0.0,
    chunk: int = 256,
):
    """The plan as batches of ``replica_batch`` decoded, viewed (or mirrored) uint8 images.

    With views, each batch is rendered by ``distill.views.render_tf``: TensorFlow ops that give
    the pixels of ``distill.views.render`` (the NumPy function the embed actor used) bit for bit,
    so the student sees the teacher's exact pixels (the tests compare them).
    """
    import tensorflow as tf

    from distill.views import TAPS, render_tf

    h, w = shards.input_size
    d = shards.embedding_dim
    signature = {
        "image": tf.TensorSpec([None], tf.string),
        "target": tf.TensorSpec([None, d], tf.float32),
        "label": tf.TensorSpec([None], tf.int64),
        "index": tf.TensorSpec([None], tf.int64),
        "flipped": tf.TensorSpec([None], tf.bool),
        "view": tf.TensorSpec([None], tf.int64),
        "y0": tf.TensorSpec([None, h], tf.int32),
        "y1": tf.TensorSpec([None, h], tf.int32),
        "wy": tf.TensorSpec([None, h], tf.float32),
        "x0": tf.TensorSpec([None, w], tf.int32),
        "x1": tf.TensorSpec([None, w], tf.int32),
        "wx": tf.TensorSpec([None, w], tf.float32),
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
        # TensorFlow ops, bit-identical to the NumPy render the teacher's side used, outside the GIL.
        x = render_tf(b["image"], {k: b[k] for k in TAPS}, b["flipped"], b["brightness"], b["contrast"],
                      b["saturation"], b["grey"])
        return {**b, "image": tf.ensure_shape(x, [replica_batch, h, w, 3])}

    def finish(b):
        return {k: v for k, v in b.items() if k not in ("brightness", "contrast", "saturation", "grey", *TAPS)}

    ds = _chunk_source(chunks, signature).unbatch()
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(replica_batch, drop_remainder=True)
    if views:
        ds = ds.map(render, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)
