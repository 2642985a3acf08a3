"""The teacher pass: listing -> shard plan -> Ray actors -> Parquet shards + manifest.

The driver owns the run: it checks the listing, teacher and output agree (before starting
Ray), reconciles the ledger with the shard files, leases shards, feeds them to actors
(``workers.embed_actor``), renews its leases while they work, marks shards done once their
files are durable, and writes ``manifest.json`` last. Kill it at any point and rerun the
same command: done shards are kept, leased ones come back, every row is embedded once.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from distill.teacher import Preprocessing, TeacherSpec
from distill.views import ViewSpec
from shards.format import EMBEDDING_DTYPES, ShardRecord
from shards.ledger import Ledger, new_owner, open_ledger
from shards.manifest import build_manifest, check_compatible, read_manifest, run_id, write_manifest
from shards.plan import num_shards, shard_at
from shards.reconcile import adopt_file, plan_reconcile, shard_files
from shards.storage import Storage, is_temp_name, open_storage, redact

log = logging.getLogger(__name__)

PER_ACTOR_QUEUE = 2  # one shard on the teacher, one writing its file or waiting its turn


@dataclass(frozen=True)
class EmbedConfig:
    listing: str
    teacher: str
    out: str
    shard_size: int = 1024
    batch_size: int = 64
    workers: int | None = None  # None: one per GPU when --gpus-per-worker > 0, else 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None  # None: 1 with GPUs, else the cluster's CPUs / workers
    worker_resources: tuple[tuple[str, float], ...] = ()
    address: str | None = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    flip: bool = True
    views: ViewSpec = field(default_factory=ViewSpec)
    dtype: str = "float32"
    images: bool = True
    signature: str = "serving_default"
    teacher_output: str | None = None
    ledger: str = "file"
    lease_seconds: float = 60.0
    max_attempts: int = 3
    decode_threads: int | None = None  # None: the actor's CPUs, at least 4
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got {self.dtype!r}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.lease_seconds < 3:
            raise ValueError(f"--lease-seconds must be >= 3 (heartbeats renew at a third of it), got {self.lease_seconds}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("--shard-size and --batch-size must be positive")
        if self.decode_threads is not None and self.decode_threads < 1:
            raise ValueError(f"--decode-threads must be >= 1, got {self.decode_threads}")
        if self.views.count and not self.images:
            raise ValueError("--views needs the images in the shards (the student re-renders each view from them); "
                             "drop --no-images")


@dataclass(frozen=True)
class EmbedReport:
    out: str
    rows_total: int
    rows_done: int
    errors: int
    shards_total: int
    shards_done: int
    shards_this_run: int
    rows_this_run: int
    seconds: float
    images_per_second: float
    complete: bool


class ShardsFailed(RuntimeError):
    """Some shards failed every attempt; the rest are done and kept."""


@dataclass(frozen=True)
class Run:
    """The resolved, checked run: what the manifest's identity says."""

    identity: dict
    run_id: str
    spec: TeacherSpec
    rec: str | None
    paths: bool
    num_shards: int


# ------------------------------------------------------------------ resolve and check


def resolve_run(cfg: EmbedConfig) -> Run:
    """Check listing, teacher and options; fingerprint them. No Ray, no output written."""
    from distill.listing import listing_fingerprint, read_listing_info
    from distill.teacher import inspect_teacher, teacher_fingerprint

    if not os.path.exists(cfg.listing):
        raise FileNotFoundError(f"listing {cfg.listing} not found: make it with `distill listing SOURCE --out {cfg.listing}`")
    info = read_listing_info(cfg.listing)
    if info.rows == 0:
        raise ValueError(f"listing {cfg.listing} has no rows; nothing to embed")
    teacher_fp = teacher_fingerprint(cfg.teacher)
    spec = _spec_from_manifest(cfg, teacher_fp) or inspect_teacher(os.path.abspath(cfg.teacher), cfg.signature, cfg.teacher_output)
    identity = {
        "listing": os.path.abspath(cfg.listing),
        "listing_fingerprint": listing_fingerprint(cfg.listing),
        "rows": info.rows,
        "num_classes": info.num_classes,
        "label_names": list(info.label_names) if info.label_names else None,
        "teacher": os.path.abspath(cfg.teacher),
        "teacher_fingerprint": teacher_fp,
        "teacher_signature": {"name": spec.signature, "input": spec.input_name, "output": spec.output_name},
        "input_size": [spec.height, spec.width],
        "preprocessing": cfg.preprocessing.to_json(),
        "embedding_dim": spec.embedding_dim,
        "dtype": cfg.dtype,
        "flip": cfg.flip,
        "views": cfg.views.to_json() if cfg.views.count else None,
        "images": cfg.images,
        "shard_size": cfg.shard_size,
        "batch_size": cfg.batch_size,
    }
    return Run(identity, run_id(identity), spec, info.rec, info.kind != "rec", num_shards(info.rows, cfg.shard_size))


def _spec_from_manifest(cfg: EmbedConfig, teacher_fp: str) -> TeacherSpec | None:
    """The teacher's signature as an earlier run into ``--out`` read it, when the teacher's
    files are byte-identical: a resume then skips importing TensorFlow in the driver."""
    try:
        m = read_manifest(open_storage(cfg.out, create=False))
    except (FileNotFoundError, ValueError):
        return None
    if not m or m.get("teacher_fingerprint") != teacher_fp:
        return None
    sig = m["teacher_signature"]
    if sig["name"] != cfg.signature or cfg.teacher_output not in (None, sig["output"]):
        return None
    h, w = m["input_size"]
    return TeacherSpec(os.path.abspath(cfg.teacher), sig["name"], sig["input"], sig["output"], h, w, 3, m["embedding_dim"])


def open_output(cfg: EmbedConfig, run: Run) -> Storage:
    """The output storage, refusing one that holds another run's shards."""
    storage = open_storage(cfg.out)
    existing = read_manifest(storage)
    if existing is not None:
        check_compatible(existing, run.identity, storage.root)
    else:
        write_manifest(storage, build_manifest(run.identity, [], run.num_shards))
    return storage


def reconcile(storage: Storage, ledger: Ledger, owner: str, run: Run, lease_seconds: float) -> None:
    """Make the ledger agree with the shard files (the truth), and clear stale temp files."""
    state = ledger.snapshot()
    files = shard_files(storage, run.num_shards)
    forget, adopt = plan_reconcile({k: r.bytes for k, r in state.done.items()}, files, run.num_shards)
    if forget:
        log.warning("%d shard(s) marked done have no matching file; redoing them: %s", len(forget), forget[:10])
        ledger.forget(forget)
    for k in adopt:
        rec = adopt_file(storage, run.run_id, k)
        if rec is not None:
            ledger.complete(owner, rec)
    if storage.is_local:
        now = time.time()
        for name in storage.list():
            # Another live driver may be mid-write: only clear temp files far older than a lease.
            if is_temp_name(name) and now - storage.mtime(name) > 4 * lease_seconds:
                storage.remove(name)


def finalize(storage: Storage, ledger: Ledger, run: Run) -> dict:
    state = ledger.snapshot()
    manifest = build_manifest(run.identity, state.done.values(), run.num_shards)
    write_manifest(storage, manifest)
    return manifest


# ------------------------------------------------------------------ the run


def run_embed(cfg: EmbedConfig) -> EmbedReport:
    t0 = time.perf_counter()
    run = resolve_run(cfg)
    storage = open_output(cfg, run)
    ledger = open_ledger(cfg.ledger, cfg.out, run.num_shards, run.run_id)
    owner = new_owner()
    rows_this_run = shards_this_run = 0
    try:
        reconcile(storage, ledger, owner, run, cfg.lease_seconds)
        state = ledger.snapshot()
        if len(state.done) < run.num_shards:
            log.info(
                "embedding %d rows into %s: %d of %d shards done, ledger: %s",
                run.identity["rows"], storage.root, len(state.done), run.num_shards, ledger.describe(),
            )
            shards_this_run, rows_this_run = _drive(cfg, run, ledger, owner)
        manifest = finalize(storage, ledger, run)
    finally:
        ledger.close()
    seconds = time.perf_counter() - t0
    return EmbedReport(
        out=storage.root,
        rows_total=run.identity["rows"],
        rows_done=manifest["rows_done"],
        errors=manifest["error_count"],
        shards_total=run.num_shards,
        shards_done=len(manifest["shards"]),
        shards_this_run=shards_this_run,
        rows_this_run=rows_this_run,
        seconds=seconds,
        images_per_second=rows_this_run / seconds if seconds > 0 else 0.0,
        complete=manifest["complete"],
    )


class _Heartbeat(threading.Thread):
    """Renews this driver's leases every third of their lifetime while shards are in flight."""

    def __init__(self, ledger: Ledger, owner: str, ttl: float):
        super().__init__(daemon=True, name="lease-heartbeat")
        self.ledger, self.owner, self.ttl = ledger, owner, ttl
        self.held: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.ttl / 3):
            with self.lock:
                ks = sorted(self.held)
            if not ks:
                continue
            try:
                kept = self.ledger.renew(self.owner, ks, self.ttl, time.time())
            except Exception as e:  # a flaky ledger must not kill the run; expiry is the fallback
                log.warning("lease renewal failed (%s); will retry", e)
                continue
            with self.lock:  # shards completed since the read are not lost, just done
                lost = (set(ks) - set(kept)) & self.held
            if lost:
                # Someone else took them after we stalled; both write identical bytes, so go on.
                log.warning("lost leases on shards %s to another driver", sorted(lost))


@dataclass
class _Slot:
    actor: Any
    ready_ref: Any
    ready: bool = False
    inflight: list = field(default_factory=list)  # shard numbers


def _drive(cfg: EmbedConfig, run: Run, ledger: Ledger, owner: str) -> tuple[int, int]:
    """Lease, dispatch, collect. Returns (shards, rows) finished by this driver."""
    import ray
    from tqdm import tqdm

    from distill.listing import ListingReader
    from workers.embed_actor import EmbedTask, EmbedWorker

    _init_ray(cfg)
    workers, cpus = _resolve_resources(cfg)
    task = EmbedTask(
        teacher=run.spec, pre=cfg.preprocessing, out=cfg.out, run_id=run.run_id, batch_size=cfg.batch_size,
        flip=cfg.flip, views=cfg.views, dtype=cfg.dtype, images=cfg.images, paths=run.paths, rec=run.rec,
        threads=max(1, int(cpus)), decode_threads=cfg.decode_threads or max(4, int(cpus)),
    )
    actor_cls = ray.remote(EmbedWorker).options(
        num_cpus=cpus, num_gpus=cfg.gpus_per_worker, resources=dict(cfg.worker_resources) or None,
        max_restarts=0, max_task_retries=0,
        # Threaded: a shard's Parquet encode + write overlaps the next shard's teacher batches.
        max_concurrency=PER_ACTOR_QUEUE,
    )

    def new_slot() -> _Slot:
        actor = actor_cls.remote(task)
        return _Slot(actor, actor.ready.remote())

    slots = [new_slot() for _ in range(workers)]
    reader = ListingReader(cfg.listing)
    total = run.identity["rows"]
    beat = _Heartbeat(ledger, owner, cfg.lease_seconds)
    beat.start()
    queue: deque[int] = deque()  # leased here, not yet dispatched
    running: dict[Any, tuple[int, _Slot]] = {}  # generator -> (k, slot)
    progress: dict[int, int] = {}  # rows yielded by the current attempt of k
    attempts: dict[int, int] = {}
    failed: dict[int, str] = {}
    done_here = rows_here = start_failures = 0
    last_manifest = time.monotonic()
    storage = open_storage(cfg.out)

    def hold(ks):
        with beat.lock:
            beat.held.update(ks)

    def unhold(k):
        with beat.lock:
            beat.held.discard(k)

    def rows_done_overall(state) -> int:
        return sum(shard_at(k, total, cfg.shard_size).rows for k in state.done)

    state = ledger.snapshot()
    bar = tqdm(total=total, initial=rows_done_overall(state), unit="img", desc="embed", disable=not cfg.progress,
               dynamic_ncols=True, smoothing=0.05)
    try:
        while True:
            # 1. Fill every ready actor's queue, leasing more shards when ours run out.
            for slot in slots:
                while slot.ready and len(slot.inflight) < PER_ACTOR_QUEUE:
                    if not queue:
                        want = sum(PER_ACTOR_QUEUE - len(s.inflight) for s in slots if s.ready)
                        got = ledger.acquire(owner, max(1, want), cfg.lease_seconds, time.time())
                        got = [k for k in got if k not in failed]
                        hold(got)
                        queue.extend(got)
                        if not queue:
                            break
                    k = queue.popleft()
                    shard = shard_at(k, total, cfg.shard_size)
                    gen = slot.actor.embed_shard.options(num_returns="streaming").remote(shard, reader.rows(shard.start, shard.stop))
                    running[gen] = (k, slot)
                    slot.inflight.append(k)
                    progress[k] = 0

            waiting_on = list(running) + [s.ready_ref for s in slots if not s.ready]
            if not running:
                # Nothing in flight: finished even if a replacement actor can never be placed
                # (its node died and no other node has the resources).
                state = ledger.snapshot()
                if len(state.done) + len(failed) >= run.num_shards:
                    break
            if not waiting_on:
                # The rest is leased by other drivers: wait for them, or for their leases to expire.
                bar.n = rows_done_overall(state)
                bar.set_postfix_str(f"waiting on {run.num_shards - len(state.done)} shards leased elsewhere")
                time.sleep(min(2.0, cfg.lease_seconds / 3))
                continue

            ready, _ = ray.wait(waiting_on, num_returns=1, timeout=1.0)
            for item in ready:
                slot = next((s for s in slots if not s.ready and s.ready_ref == item), None)
                if slot is not None:
                    try:
                        ray.get(item)
                    except ray.exceptions.RayActorError as e:
                        # Its node died while it loaded the teacher: start another one.
                        start_failures += 1
                        if start_failures > workers * cfg.max_attempts:
                            raise ValueError(f"teacher actors keep dying while starting: {_first_line(e)}") from e
                        log.warning("a teacher actor died while starting (%s); replacing it", _first_line(e))
                        slots[slots.index(slot)] = new_slot()
                        continue
                    except ray.exceptions.RayError as e:  # the constructor raised: same for every actor
                        raise ValueError(f"a teacher actor failed to start: {_first_line(e)}") from e
                    slot.ready = True
                    continue
                k, slot = running[item]
                try:
                    value = ray.get(next(item))
                except StopIteration:
                    del running[item]
                    continue
                except (ray.exceptions.RayError, OSError, ValueError) as e:
                    del running[item]
                    slot.inflight.remove(k)
                    bar.update(-progress.pop(k, 0))
                    attempts[k] = attempts.get(k, 0) + 1
                    dead = isinstance(e, ray.exceptions.RayActorError)
                    log.warning("shard %d attempt %d failed (%s): %s", k, attempts[k], "actor died" if dead else "error", _first_line(e))
                    if dead:
                        # Replace the actor; shards queued behind this one go back, no attempt spent.
                        for g, (kk, s) in list(running.items()):
                            if s is slot:
                                del running[g]
                                bar.update(-progress.pop(kk, 0))
                                queue.appendleft(kk)
                        slot.inflight.clear()
                        slots[slots.index(slot)] = new_slot()
                    if attempts[k] < cfg.max_attempts:
                        queue.appendleft(k)
                    else:
                        failed[k] = _first_line(e)
                        ledger.release(owner, [k])
                        unhold(k)
                    continue
                if isinstance(value, int):
                    progress[k] += value
                    bar.update(value)
                    continue
                record = ShardRecord.from_json(value)
                ledger.complete(owner, record)
                unhold(k)
                slot.inflight.remove(k)
                progress.pop(k, None)
                done_here += 1
                rows_here += record.rows + len(record.errors)
                if time.monotonic() - last_manifest > 60:
                    finalize(storage, ledger, run)
                    last_manifest = time.monotonic()
    except BaseException:
        # Interrupted (Ctrl-C) or crashed: hand leases back so a rerun starts at once.
        with beat.lock:
            held = sorted(beat.held)
        try:
            ledger.release(owner, held)
        except Exception:
            pass
        raise
    finally:
        beat.stop.set()
        bar.close()
        for slot in slots:
            ray.kill(slot.actor, no_restart=True)
    if failed:
        details = "; ".join(f"shard {k}: {why}" for k, why in sorted(failed.items())[:5])
        raise ShardsFailed(
            f"{len(failed)} shard(s) failed {cfg.max_attempts} times and were left pending ({details}). "
            "Fix the cause and rerun the same command: finished shards are kept."
        )
    return done_here, rows_here


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1][:300] if text else type(e).__name__


def _init_ray(cfg: EmbedConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {"TF_CPP_MIN_LOG_LEVEL": "2"}
    if cfg.address:
        log.info("connecting to Ray at %s", redact(cfg.address))
        ray.init(address=cfg.address, runtime_env={"env_vars": env}, logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, runtime_env={"env_vars": env}, logging_level=logging.WARNING, log_to_driver=False)


def _resolve_resources(cfg: EmbedConfig) -> tuple[int, float]:
    """(actors, CPUs per actor) from the options and what the cluster has."""
    import ray

    res = ray.cluster_resources()
    if cfg.gpus_per_worker > 0:
        gpus = res.get("GPU", 0)
        if cfg.workers is None:
            if gpus < cfg.gpus_per_worker:
                raise ValueError(
                    f"--gpus-per-worker {cfg.gpus_per_worker:g} but the Ray cluster has {gpus:g} GPUs now; pass "
                    "--workers N to wait for an autoscaler to add them, or drop --gpus-per-worker to run on CPU"
                )
            return max(1, int(gpus // cfg.gpus_per_worker)), cfg.cpus_per_worker or 1.0
        if gpus < cfg.workers * cfg.gpus_per_worker:
            log.warning("the cluster has %g GPUs for %d actors; they start as the autoscaler adds nodes",
                        gpus, cfg.workers)
        return cfg.workers, cfg.cpus_per_worker or 1.0
    workers = cfg.workers or 1
    cpus = cfg.cpus_per_worker or max(1.0, float(int(res.get("CPU", 1) // workers)))
    return workers, cpus


# ------------------------------------------------------------------ CLI


def _resource(text: str) -> tuple[str, float]:
    name, eq, amount = text.partition("=")
    try:
        return name, float(amount) if eq else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT, got {text!r}") from None


def _pair(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition(",")
    try:
        return (float(lo), float(hi)) if sep else (float(lo), float(lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (e.g. 0.8,1.0), got {text!r}") from None


def view_spec_from_args(a) -> ViewSpec:
    base = ViewSpec()
    return ViewSpec(
        count=a.views, seed=a.view_seed, scale=a.view_scale, grey=a.view_grey,
        brightness=base.brightness * a.view_colour, contrast=base.contrast * a.view_colour,
        saturation=base.saturation * a.view_colour,
    )


def add_cli(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="run the teacher over a listing into Parquet shards (resumable)",
        description="Run the teacher over every listing row on Ray actors, writing one Parquet shard per "
        "planned shard plus manifest.json. Rerun the same command after any interruption to resume.",
    )
    p.add_argument("listing", help="listing Parquet made by `distill listing`")
    p.add_argument("--teacher", required=True, help="teacher TensorFlow SavedModel directory")
    p.add_argument("--out", required=True, help="shard directory (local/NFS path or s3://, gs:// URI)")
    g = p.add_argument_group("plan")
    g.add_argument("--shard-size", type=int, default=1024, help="rows per shard (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=64, help="images per teacher call (default: %(default)s)")
    g = p.add_argument_group("Ray")
    g.add_argument("--workers", type=int, default=None, help="teacher actors (default: one per GPU, or 1 on CPU)")
    g.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (default: 0, CPU)")
    g.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs per actor (default: 1 with GPUs, else the cluster's CPUs / workers)")
    g.add_argument("--worker-resource", type=_resource, action="append", default=[], metavar="NAME=AMOUNT",
                   help="custom Ray resource each actor needs (repeatable), e.g. to pin actors to node types")
    g.add_argument("--address", default=None, help="existing Ray cluster (e.g. auto, ray://head:10001); default: start a local one")
    g.add_argument("--decode-threads", type=int, default=None,
                   help="threads per actor that read, decode and preprocess images (default: the actor's CPUs, at least 4)")
    g = p.add_argument_group("teacher input conventions (insightface defaults)")
    g.add_argument("--pixel-mean", type=float, default=127.5, help="subtracted from 0..255 pixels (default: %(default)s)")
    g.add_argument("--pixel-scale", type=float, default=128.0, help="then divided by this (default: %(default)s)")
    g.add_argument("--channel-order", choices=("RGB", "BGR"), default="RGB", help="default: %(default)s")
    g.add_argument("--signature", default="serving_default", help="SavedModel signature (default: %(default)s)")
    g.add_argument("--teacher-output", default=None, help="signature output holding the embedding (default: the only one)")
    g = p.add_argument_group("what the shards store")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="also store the teacher's embedding of the mirrored image (default: on)")
    g.add_argument("--views", type=int, default=0, metavar="K",
                   help="also store the teacher's embedding of K augmented views of every image (random crop, "
                        "mirror, colour and grey jitter; see distill/views.py), which `distill train` re-renders "
                        "bit-exactly and trains on (default: 0, none; costs K more teacher calls per image)")
    g.add_argument("--view-seed", type=int, default=0, help="seed of the views' parameters (default: %(default)s)")
    g.add_argument("--view-scale", type=_pair, default=ViewSpec.scale, metavar="LO,HI",
                   help="crop side as a fraction of the image side (default: %s)" % ",".join(map(str, ViewSpec.scale)))
    g.add_argument("--view-colour", type=float, default=1.0, metavar="F",
                   help="scales the brightness, contrast and saturation jitter (0: none; default: 1)")
    g.add_argument("--view-grey", type=float, default=ViewSpec.grey, metavar="P",
                   help="probability of a grey view (default: %(default)s)")
    g.add_argument("--dtype", choices=EMBEDDING_DTYPES, default="float32", help="stored embedding type (default: %(default)s)")
    g.add_argument("--no-images", dest="images", action="store_false", help="store paths only, not image bytes")
    g = p.add_argument_group("ledger")
    g.add_argument("--ledger", default="file", help="'file' (next to the shards, default) or redis://[:PASSWORD@]HOST:PORT/DB")
    g.add_argument("--lease-seconds", type=float, default=60.0, help="lease lifetime; renewed every third (default: %(default)s)")
    g.add_argument("--max-attempts", type=int, default=3, help="tries per shard before it is left pending (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_main)


def config_from_args(a) -> EmbedConfig:
    return EmbedConfig(
        listing=a.listing, teacher=a.teacher, out=a.out, shard_size=a.shard_size, batch_size=a.batch_size,
        workers=a.workers, gpus_per_worker=a.gpus_per_worker, cpus_per_worker=a.cpus_per_worker,
        worker_resources=tuple(a.worker_resource), address=a.address,
        preprocessing=Preprocessing(a.pixel_mean, a.pixel_scale, a.channel_order),
        flip=a.flip, views=view_spec_from_args(a), dtype=a.dtype, images=a.images, signature=a.signature,
        teacher_output=a.teacher_output,
        ledger=a.ledger, lease_seconds=a.lease_seconds, max_attempts=a.max_attempts,
        decode_threads=a.decode_threads, progress=a.progress,
    )


def _main(a) -> int:
    try:
        r = run_embed(config_from_args(a))
    except ShardsFailed as e:
        print(f"distill embed: {e}")
        return 1
    state = "complete" if r.complete else "INCOMPLETE"
    print(
        f"embed {state}: {r.rows_done}/{r.rows_total} rows in {r.shards_done}/{r.shards_total} shards, "
        f"{r.errors} unreadable rows recorded; this run: {r.rows_this_run} rows in {r.seconds:.1f}s "
        f"({r.images_per_second:.1f} img/s) -> {r.out}"
    )
    if r.errors:
        print(f"  see `distill status {a.out} --errors` for the unreadable rows")
    return 0 if r.complete else 1
