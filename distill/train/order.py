"""The epoch order and the data cursor: which samples train, in which order, on which worker.
Pure NumPy: no files, no TensorFlow; ``distill.train.stream`` reads what it decides.

The order is a pure function of (shard row counts, seed, epoch, partitions, buffer size), and
not of the worker count (``epoch_order``):

1. shuffle the shard order with a numpy Generator seeded from (seed, epoch) and lay their
   rows end to end (held-out rows left out);
2. cut that stream into P = ``--partitions`` contiguous parts and shuffle each with its own
   bounded buffer (its share of ``--shuffle-buffer``), simulated on sample ids only;
3. interleave the parts: element e of part p is global sample e * P + p;
4. global batch s is samples [s B, (s + 1) B); the last partial batch is dropped (a different
   one each epoch). Worker r of W (W dividing P and B) takes positions r::W of every batch,
   which all lie in parts p = r mod W, so it reads only those parts' shards.

The resume cursor is (epoch, samples consumed in the epoch, global), so a run saved with one
worker count goes on with any other that divides P at exactly the next sample. Per sample,
``flip_mask`` (mirrored or not) and ``choose_target`` (its teacher target) are pure too. The
order costs 8 bytes per sample of the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from distill.errors import BadOption, IncompatibleRun

# Tags keep the random streams of different decisions independent for one (seed, epoch).
_SHARD_ORDER, _BUFFER = 0, 1
_FLIP_SALT = 0x9E3779B97F4A7C15
# The epoch order's canonical partitions (``epoch_order``): any worker count dividing it can
# continue a run. 24 = 1, 2, 3, 4, 6, 8, 12 or 24 workers; a worker holds up to one row group
# per partition it reads beside the shuffle buffer.
DEFAULT_PARTITIONS = 24


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


def choose_target(embedding: np.ndarray, embedding_flip: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """The teacher's embedding of the pixels the student actually sees (plain or mirrored)."""
    return np.where(np.asarray(flipped, bool)[:, None], embedding_flip, embedding).astype(np.float32)
