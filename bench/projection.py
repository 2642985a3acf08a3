"""The benchmarks' arithmetic, kept pure so it is unit-tested and reads as the assumptions it
encodes: steady-state rates from completion events, and the emore-scale projection of the
teacher pass and of one student epoch on N GPUs from per-image costs measured here and the
FLOP counts in DESIGN.md. No clock, no filesystem, no TensorFlow, no Ray.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

EMORE_ROWS = 5_822_653
EMORE_CLASSES = 85_742
IRESNET100_GFLOPS = 24.2  # per 112x112 image, forward (DESIGN.md)
H100_BF16_TFLOPS = 990.0  # dense bf16 peak
MFU = 0.40  # "a realistic 40%" (DESIGN.md)


def steady_rate(events: Sequence[tuple[float, int]], skip: int = 0) -> float:
    """Rows/s between the first and the last completion event, after dropping ``skip``.

    ``events`` are (time, rows finished by that event) in any order. The rows of the first
    kept event are not counted: they were started before the clock's first reading, together
    with start-up and warm-up, which is exactly what a steady-state rate leaves out.
    """
    ev = sorted(events)[skip:]
    if len(ev) < 2:
        raise ValueError(f"a steady-state rate needs at least 2 completion events, got {len(ev)}")
    span = ev[-1][0] - ev[0][0]
    rows = sum(r for _, r in ev[1:])
    if span <= 0:
        raise ValueError("completion events span no time; measure more rows")
    return rows / span


def interpolate(series: Sequence[tuple[float, float]], t: float) -> float:
    """The value of a sampled, sorted (time, value) series at time ``t`` (linear; clamped)."""
    if not series:
        raise ValueError("no samples")
    if t <= series[0][0]:
        return series[0][1]
    for (t0, v0), (t1, v1) in zip(series, series[1:]):
        if t0 <= t <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
    return series[-1][1]


def steady_cpu_per_row(events: Sequence[tuple[float, int]], cpu: Sequence[tuple[float, float]], skip: int = 0) -> float:
    """CPU seconds per row over the same window as ``steady_rate``: CPU between the first and
    the last kept completion event / the rows finished after the first."""
    ev = sorted(events)[skip:]
    if len(ev) < 2:
        raise ValueError(f"needs at least 2 completion events, got {len(ev)}")
    rows = sum(r for _, r in ev[1:])
    return (interpolate(cpu, ev[-1][0]) - interpolate(cpu, ev[0][0])) / rows


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    if not s:
        raise ValueError("median of nothing")
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def rewritten(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """Names present in both whose (inode, mtime_ns) changed: files written again.

    Shard writes are temp file + rename, so a rewrite always gets a new inode."""
    return sorted(n for n, ident in before.items() if n in after and after[n] != ident)


# ---------------------------------------------------------------------------- emore projection

@dataclass(frozen=True)
class Costs:
    """Per-image and per-shard costs measured on this machine (CPU seconds unless noted)."""

    decode_cpu_s: float  # read + JPEG decode + prepare, one 112x112 image (an embed actor decode thread)
    preprocess_cpu_s: float  # scale one image into its batch slot and its mirror into the flip batch (same thread)
    train_decode_cpu_s: float  # the trainer's input path per image: Parquet read, shuffle, decode, flip, scale
    encode_cpu_s_per_row: float  # Parquet encode of one row (embedding(s) + image bytes)
    shard_write_s: float  # durable write of one shard: temp file, fsync, rename, directory fsync
    shard_bytes_per_row: float  # Parquet bytes per row (image + embedding(s))
    ledger_ops_per_s: float  # sustained ledger operations/s (acquire/renew/complete mix)


@dataclass(frozen=True)
class Cluster:
    """What is assumed, not measured: the GPUs and what each one gets."""

    gpus: int
    cpus_per_gpu: float = 12.0  # e.g. 8x H100 nodes with ~192 vCPUs, half of them free for input work
    decode_threads: int = 6  # the embed actor's decode threads (``--decode-threads``; default = its CPUs)
    tflops: float = H100_BF16_TFLOPS
    mfu: float = MFU
    storage_gb_s: float = 10.0  # aggregate write or read bandwidth of the shared store
    shard_size: int = 1024
    ledger_ops_per_shard: float = 3.0  # acquire + complete + about one renew (renews are batched per driver)


@dataclass(frozen=True)
class Projection:
    gpus: int
    gpu_s: float  # the compute bound: FLOPs / (N x peak x MFU)
    decode_s: float  # input CPU on its threads (teacher pass: decode + preprocess), beside the GPU
    write_s: float  # shard encode + durable write, beside the next shard's batches (teacher pass only)
    storage_s: float  # bytes written (teacher pass) or read (epoch) / bandwidth
    ledger_s: float  # shards x ops per shard / ledger ops/s (teacher pass only)
    wall_s: float  # the slowest of all the above: everything overlaps
    bound: str  # which one

    def to_json(self) -> dict:
        return asdict(self)


def _pick(bounds: dict[str, float]) -> tuple[float, str]:
    name = max(bounds, key=bounds.get)
    return bounds[name], name


def project_teacher_pass(costs: Costs, cluster: Cluster, rows: int = EMORE_ROWS,
                         gflops_per_image: float = IRESNET100_GFLOPS, flip: bool = True) -> Projection:
    """Wall time of the teacher pass over ``rows`` images on ``cluster.gpus`` GPUs.

    One actor per GPU, as ``distill embed --gpus-per-worker 1`` runs it. Within an actor
    everything runs beside the GPU: ``decode_threads`` threads (at most ``cpus_per_gpu``
    cores) read, decode and preprocess the next batch straight into the batch arrays, and
    the previous shard's Parquet encode and durable write run on a second shard thread. So
    each GPU's time is the slowest of those three streams. With ``flip`` the teacher runs
    twice per image, decode once. Storage and the ledger are shared by all GPUs. Wall time =
    the slowest of: per-GPU worker time, storage, ledger.
    """
    n = cluster.gpus
    if n < 1:
        raise ValueError(f"gpus must be >= 1, got {n}")
    passes = 2 if flip else 1
    per_gpu = rows / n
    shards = -(-rows // cluster.shard_size)
    cores = min(cluster.decode_threads, cluster.cpus_per_gpu)
    gpu_s = per_gpu * passes * gflops_per_image * 1e9 / (cluster.tflops * 1e12 * cluster.mfu)
    decode_s = per_gpu * (costs.decode_cpu_s + costs.preprocess_cpu_s) / cores
    write_s = (shards / n) * (cluster.shard_size * costs.encode_cpu_s_per_row + costs.shard_write_s)
    storage_s = rows * costs.shard_bytes_per_row / (cluster.storage_gb_s * 1e9)
    ledger_s = shards * cluster.ledger_ops_per_shard / costs.ledger_ops_per_s
    wall, bound = _pick({"GPU compute": gpu_s, "CPU decode": decode_s, "shard encode + write": write_s,
                         "storage": storage_s, "ledger": ledger_s})
    return Projection(n, gpu_s, decode_s, write_s, storage_s, ledger_s, wall, bound)


def project_student_epoch(costs: Costs, cluster: Cluster, student_gflops: float, rows: int = EMORE_ROWS) -> Projection:
    """Wall time of one student epoch over ``rows`` shard rows on ``cluster.gpus`` GPUs.

    A training step costs about 3x the forward FLOPs (forward, and backward for activations
    and weights). The input pipeline (tf.data, parallel map) decodes every image once per
    epoch on the GPU's ``cpus_per_gpu`` cores, overlapped with the GPU, and the whole shard
    set is read from storage once. No ledger, nothing serial per shard.
    """
    n = cluster.gpus
    if n < 1:
        raise ValueError(f"gpus must be >= 1, got {n}")
    gpu_s = rows * 3 * student_gflops * 1e9 / (n * cluster.tflops * 1e12 * cluster.mfu)
    decode_s = rows * costs.train_decode_cpu_s / (n * cluster.cpus_per_gpu)
    storage_s = rows * costs.shard_bytes_per_row / (cluster.storage_gb_s * 1e9)
    wall, bound = _pick({"GPU compute": gpu_s, "CPU input": decode_s, "storage": storage_s})
    return Projection(n, gpu_s, decode_s, 0.0, storage_s, 0.0, wall, bound)
