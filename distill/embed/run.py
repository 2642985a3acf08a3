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
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from distill.errors import BadInput, BadOption, ShardsFailed, Stopped, StorageFull, storage_fix
from distill.heartbeat import DEFAULT_EVERY as HEARTBEAT
from distill.heartbeat import check_every
from distill.options import add_options, option
from distill.options import config_from_args as options_config
from distill.outputs import SHARDS, check_output
from distill.shards.format import EMBEDDING_DTYPES, ShardRecord
from distill.shards.ledger import Ledger, new_owner, open_ledger
from distill.shards.manifest import build_manifest, check_compatible, read_manifest, run_id, write_manifest
from distill.shards.plan import num_shards, parse_shard_name, shard_at, shard_name
from distill.shards.reconcile import adopt_file, plan_reconcile, shard_files
from distill.startup import Phases, show_progress, versions
from distill.stopping import StopRequest, start_ray
from distill.storage import Storage, is_temp_name, is_uri, open_storage, redact, store_env
from distill.teacher import CHANNEL_ORDERS, Preprocessing, TeacherError, TeacherSpec
from distill.views import ViewSpec

log = logging.getLogger(__name__)

PER_ACTOR_QUEUE = 2  # one shard on the teacher, one writing its file or waiting its turn
TEACHER_GROUP = "teacher input conventions (insightface defaults)"
STORED_GROUP = "what the shards store"


@dataclass(frozen=True)
class EmbedConfig:
    """The options of ``distill embed``: each field with ``option`` metadata is its CLI option
    (``add_cli``); the teacher's input conventions and the views are their own dataclasses."""

    listing: str = option(help="listing Parquet made by `distill listing` (a path or an object-store URI)",
                          positional=True, path=True, metavar="LISTING")
    teacher: str = option(help="teacher TensorFlow SavedModel directory (or an object-store URI: each actor fetches "
                               "it once into its node's cache and checks its fingerprint)", path=True, metavar="DIR")
    out: str = option(help="shard directory (local/NFS path or s3://, gs:// URI)", path=True, metavar="DIR")
    shard_size: int = option(1024, "rows per shard", group="plan")
    batch_size: int = option(64, "images per teacher call", group="plan")
    workers: int | None = option(None, "teacher actors (default: one per GPU, or 1 on CPU)", group="Ray")
    gpus_per_worker: float = option(0.0, "GPUs per actor (0: CPU)", group="Ray")
    cpus_per_worker: float | None = option(
        None, "CPUs per actor, and the teacher's threads (default: 1 with GPUs, else the cluster's CPUs / workers)",
        group="Ray")
    worker_resources: tuple[tuple[str, float], ...] = ()
    address: str | None = option(None, "existing Ray cluster (e.g. auto, ray://head:10001); default: RAY_ADDRESS when "
                                 "it is set (`ray job submit` sets it), else start a local one", group="Ray")
    decode_threads: int | None = option(
        None, "threads per actor that read, decode and preprocess images (default: the actor's CPUs, at least 4)",
        group="Ray")
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    signature: str = option("serving_default", "SavedModel signature", group=TEACHER_GROUP)
    teacher_output: str | None = option(None, "signature output holding the embedding (default: the only one)",
                                        group=TEACHER_GROUP)
    flip: bool = option(True, "also store the teacher's embedding of the mirrored image", group=STORED_GROUP)
    views: ViewSpec = field(default_factory=ViewSpec)
    dtype: str = option("float32", "stored embedding type", choices=EMBEDDING_DTYPES, group=STORED_GROUP)
    images: bool = option(True, "store the image bytes (--no-images: paths only; the student needs the images)",
                          group=STORED_GROUP)
    ledger: str = option("file", "'file' (next to the shards) or redis://[:PASSWORD@]HOST:PORT/DB", group="ledger")
    lease_seconds: float = option(60.0, "lease lifetime; renewed every third", group="ledger")
    max_attempts: int = option(3, "tries per shard before it is left pending", group="ledger")
    verify: bool = option(False, "before anything else, read every done shard and check its sha256 against its "
                          "record (sizes are always checked); a shard that does not match is removed and re-embedded",
                          group="ledger")
    max_error_fraction: float = option(0.5, "exit non-zero (1) when more than this share of the rows was unreadable: "
                                       "the shards are kept, but such a run is rarely what was meant", group="ledger")
    stop_grace: float = option(30.0, "on SIGTERM / SIGINT: lease nothing new, give the shards in flight this many "
                               "seconds, release the rest, write the manifest of what is done", group="ledger")
    progress: bool | None = option(None, "progress bars (default: on a terminal only, so logs hold no bar frames)")
    heartbeat: float = option(HEARTBEAT, "with the progress bars off (not a terminal, or --no-progress): log the "
                              "shards and rows done, img/s and ETA every this many seconds; 0: never",
                              metavar="SECONDS")

    def __post_init__(self) -> None:
        if self.dtype not in EMBEDDING_DTYPES:
            raise BadOption(f"--dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got {self.dtype!r}")
        if self.workers is not None and self.workers < 1:
            raise BadOption(f"--workers must be >= 1, got {self.workers}")
        if self.lease_seconds < 3:
            raise BadOption(f"--lease-seconds must be >= 3 (heartbeats renew at a third of it), got {self.lease_seconds}")
        for name in ("shard_size", "batch_size", "max_attempts"):
            if getattr(self, name) < 1:
                raise BadOption(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        check_resources(self.cpus_per_worker, self.gpus_per_worker)
        check_every(self.heartbeat)
        if not 0 <= self.max_error_fraction <= 1:
            raise BadOption(f"--max-error-fraction is a share of the rows in [0, 1], got {self.max_error_fraction}")
        if self.stop_grace < 0:
            raise BadOption(f"--stop-grace must be >= 0 seconds, got {self.stop_grace}")
        if self.decode_threads is not None and self.decode_threads < 1:
            raise BadOption(f"--decode-threads must be >= 1, got {self.decode_threads}")
        if self.views.count and not self.images:
            raise BadOption("--views needs the images in the shards (the student re-renders each view from them); "
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


@dataclass(frozen=True)
class Run:
    """The resolved, checked run: what the manifest's identity says."""

    identity: dict
    run_id: str
    spec: TeacherSpec
    rec: str | None
    paths: bool
    num_shards: int
    listing: str = ""  # the listing's local path (for a listing on a store, this machine's copy)


# ------------------------------------------------------------------ resolve and check


def resolve_run(cfg: EmbedConfig, phases: Phases | None = None) -> Run:
    """Check listing, teacher and options; fingerprint them. No Ray, no output written."""
    from distill.embed.listing import listing_fingerprint, read_listing_info
    from distill.mirror import local_file
    from distill.teacher import fetch_teacher, inspect_teacher, teacher_fingerprint

    phases = phases or Phases()

    listing = local_file(cfg.listing, "LISTING")  # (a listing on an object store: this machine's copy)
    if not os.path.exists(listing):
        raise FileNotFoundError(f"listing {cfg.listing} not found: make it with `distill listing SOURCE --out {cfg.listing}`")
    info = read_listing_info(listing)
    if info.rows == 0:
        raise BadInput(f"listing {cfg.listing} has no rows; nothing to embed")
    phases.mark("listing")
    teacher = _teacher_location(cfg.teacher)  # (on an object store: the actors fetch it, and check this fingerprint)
    teacher_fp = teacher_fingerprint(fetch_teacher(teacher))
    phases.mark("teacher fingerprint")
    spec = _spec_from_manifest(cfg, teacher_fp) or replace(
        inspect_teacher(fetch_teacher(teacher), cfg.signature, cfg.teacher_output), path=teacher)
    phases.mark("teacher signature")
    identity = {
        "listing": redact(cfg.listing) if is_uri(cfg.listing) else listing,
        "listing_fingerprint": listing_fingerprint(listing),
        "rows": info.rows,
        "num_classes": info.num_classes,
        "label_names": list(info.label_names) if info.label_names else None,
        "unlabelled": info.unlabelled,  # rows of no identity (label -1): counted, not part of the run id
        "versions": versions(),  # what the bytes were made with (not part of the run id)
        "teacher": teacher,
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
    return Run(identity, run_id(identity), spec, info.rec, info.kind != "rec", num_shards(info.rows, cfg.shard_size),
               listing)


def _spec_from_manifest(cfg: EmbedConfig, teacher_fp: str) -> TeacherSpec | None:
    """The teacher's signature as an earlier run into ``--out`` read it, when the teacher's
    files are byte-identical: a resume then skips importing TensorFlow in the driver."""
    try:
        m = read_manifest(open_storage(cfg.out, create=False))
    except (FileNotFoundError, BadInput):  # no usable earlier manifest: inspect the teacher instead
        return None
    if not m or m.get("teacher_fingerprint") != teacher_fp:
        return None
    sig = m["teacher_signature"]
    if sig["name"] != cfg.signature or cfg.teacher_output not in (None, sig["output"]):
        return None
    h, w = m["input_size"]
    return TeacherSpec(_teacher_location(cfg.teacher), sig["name"], sig["input"], sig["output"], h, w, 3,
                       m["embedding_dim"])


def _teacher_location(teacher: str) -> str:
    return teacher.rstrip("/") if is_uri(teacher) else os.path.abspath(teacher)


def open_output(cfg: EmbedConfig, run: Run) -> Storage:
    """The output storage, refusing one that holds another run's shards."""
    return open_output_at(cfg.out, run)


def open_output_at(location: str, run: Run) -> Storage:
    """The shard storage at ``location`` with the run's manifest: refused when it holds another
    run's, written (no shards yet) when it holds none."""
    storage = open_storage(location)
    existing = read_manifest(storage)
    if existing is not None:
        check_compatible(existing, run.identity, storage.root)
    else:
        write_manifest(storage, build_manifest(run.identity, [], run.num_shards))
    return storage


def reconcile(storage: Storage, ledger: Ledger, owner: str, run: Run, lease_seconds: float,
              verify: bool = False) -> None:
    """Make the ledger agree with the shard files (the truth), and clear stale temp files.
    With ``verify``, a done shard whose bytes no longer match its record's sha256 is removed
    and redone."""
    from distill.shards.verify import Expected, check

    state = ledger.snapshot()
    files = shard_files(storage, run.num_shards)
    forget, adopt = plan_reconcile({k: r.bytes for k, r in state.done.items()}, files, run.num_shards)
    if forget:
        log.warning("%d shard(s) marked done have no matching file; redoing them: %s", len(forget), forget[:10])
        ledger.forget(forget)
    if verify:
        kept = {k: r for k, r in state.done.items() if k not in set(forget)}
        bad, _ = check(storage, [Expected(shard_name(k), r.bytes, r.sha256) for k, r in sorted(kept.items())],
                       checksum=True)
        for m in bad:
            log.warning("%s does not match its record (%s): removing it; it will be re-embedded", storage.uri(m.name), m.why)
            storage.remove(m.name)
        if bad:
            ledger.forget(sorted(parse_shard_name(m.name) for m in bad))
        log.info("verified %d done shard(s): %d re-embedded", len(kept), len(bad))
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


def warn_if_not_aligned(listing: str, height: int, width: int, sample: int = 8) -> None:
    """Say once, before the pass, when the listing's first images are not the teacher's size:
    they will be resized, not aligned, which a face-recognition teacher is badly hurt by."""
    from PIL import Image

    from distill.embed.listing import ListingReader

    with ListingReader(listing) as reader:
        paths = [p for p in reader.rows(0, min(sample, len(reader))).path if p]
    sizes = []
    for p in paths:
        try:
            with Image.open(p) as im:  # (the header only)
                sizes.append(im.size)
        except OSError:
            continue  # unreadable: the pass records it
    other = [s for s in sizes if s != (width, height)]
    if other:
        w, h = other[0]
        log.warning("%d of the first %d images are not the teacher's %dx%d (e.g. %dx%d): they are resized to it, not "
                    "aligned. If they are photos rather than aligned face crops, align them first: `distill align "
                    "SOURCE --out ALIGNED`, then list ALIGNED", len(other), len(sizes), width, height, w, h)


def finalize(storage: Storage, ledger: Ledger, run: Run) -> dict:
    state = ledger.snapshot()
    manifest = build_manifest(run.identity, state.done.values(), run.num_shards)
    write_manifest(storage, manifest)
    return manifest


# ------------------------------------------------------------------ the run


def run_embed(cfg: EmbedConfig) -> EmbedReport:
    # SIGTERM / SIGINT from the first moment on stop cleanly (a preemption notice can come
    # during start-up too): nothing new is started, what is done is kept and written down.
    with StopRequest("the teacher pass") as stop:
        return _run_embed(cfg, stop)


def _run_embed(cfg: EmbedConfig, stop: StopRequest) -> EmbedReport:
    t0 = time.perf_counter()
    phases = Phases()
    check_output(cfg.out, SHARDS, {"LISTING": cfg.listing, "--teacher": cfg.teacher})
    run = resolve_run(cfg, phases)
    # A ledger elsewhere (Redis) is reached before anything is written to --out: a bad URL or
    # an unreachable server leaves --out as it was.
    ledger = None if cfg.ledger in ("", "file") else open_ledger(cfg.ledger, cfg.out, run.num_shards, run.run_id)
    try:
        storage = open_output(cfg, run)
        ledger = ledger or open_ledger(cfg.ledger, cfg.out, run.num_shards, run.run_id)
    except BaseException:
        if ledger is not None:
            ledger.close()
        raise
    owner = new_owner()
    rows_this_run = shards_this_run = 0
    stopped_by = None
    try:
        reconcile(storage, ledger, owner, run, cfg.lease_seconds, verify=cfg.verify)
        phases.mark("output and ledger")
        state = ledger.snapshot()
        if len(state.done) < run.num_shards and not stop.requested:
            log.info(
                "embedding %d rows into %s: %d of %d shards done, ledger: %s",
                run.identity["rows"], storage.root, len(state.done), run.num_shards, ledger.describe(),
            )
            warn_if_not_aligned(run.listing, run.spec.height, run.spec.width)
            shards_this_run, rows_this_run, stopped_by = _drive(cfg, run, ledger, owner, phases, storage, run.listing,
                                                                stop)
        manifest = finalize(storage, ledger, run)
        stopped_by = stopped_by or stop.signum
        if stopped_by is not None:
            raise Stopped(
                f"stopped: {manifest['rows_done']}/{run.identity['rows']} rows in {len(manifest['shards'])}/"
                f"{run.num_shards} shards are done and kept, leases released; rerun the same command to resume",
                stopped_by)
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
    """Renews this driver's leases every third of their lifetime while shards are in flight,
    and reports the ones another driver took (``take_lost``)."""

    def __init__(self, ledger: Ledger, owner: str, ttl: float):
        super().__init__(daemon=True, name="lease-heartbeat")
        self.ledger, self.owner, self.ttl = ledger, owner, ttl
        self._held: frozenset[int] = frozenset()
        self._lost: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def track(self, held) -> None:
        with self.lock:
            self._held = frozenset(held)

    def take_lost(self) -> set[int]:
        with self.lock:
            lost, self._lost = self._lost, set()
        return lost

    def run(self) -> None:
        while not self.stop.wait(self.ttl / 3):
            with self.lock:
                ks = sorted(self._held)
            if not ks:
                continue
            try:
                kept = self.ledger.renew(self.owner, ks, self.ttl, time.time())
            except Exception as e:  # a flaky ledger must not kill the run; expiry is the fallback
                log.warning("lease renewal failed (%s); will retry", e)
                continue
            with self.lock:  # shards completed since the read are not lost, just done
                lost = (set(ks) - set(kept)) & self._held
                self._lost |= lost
            if lost:
                # Someone else took them after we stalled; both write identical bytes, so go on.
                log.warning("lost leases on shards %s to another driver", sorted(lost))


@dataclass(frozen=True)
class Job:
    """What the actors of a sharded pass run: the worker class (a plain class, wrapped in
    ``ray.remote`` here), the task it is built with, and its generator method over one shard
    (rows done after each batch, then the shard's done record)."""

    worker: type
    task: Any
    method: str
    name: str  # for the progress bar and the stop message
    unit: str = "rows"  # what a listing row is, in the heartbeat


def embed_job(cfg: EmbedConfig, run: Run, cpus: float) -> Job:
    from distill.workers.embed_actor import EmbedTask, EmbedWorker

    task = EmbedTask(
        teacher=run.spec, pre=cfg.preprocessing, out=cfg.out, run_id=run.run_id, batch_size=cfg.batch_size,
        flip=cfg.flip, views=cfg.views, dtype=cfg.dtype, images=cfg.images, paths=run.paths, rec=run.rec,
        threads=max(1, int(cpus)), decode_threads=cfg.decode_threads or max(4, int(cpus)),
        teacher_fingerprint=run.identity["teacher_fingerprint"],
    )
    return Job(EmbedWorker, task, "embed_shard", "embed")


def _drive(cfg, run: Run, ledger: Ledger, owner: str, phases: Phases, storage: Storage, listing: str,
           stop: StopRequest, job_of=embed_job) -> tuple[int, int, int | None]:
    """Lease, dispatch, collect: the Ray shell around ``shards.dispatch.Dispatcher``, which
    makes every decision, for the teacher pass (``embed_job``) or another sharded pass over a
    listing (``distill align``). Returns (shards, rows) finished by this driver and the signal
    that stopped it early (SIGTERM / SIGINT: nothing new is leased or submitted, the shards in
    flight get ``--stop-grace`` seconds), or None."""
    _init_ray(cfg, stop)  # (a signal meanwhile: a stop request, not Ray's exit)
    phases.mark("ray.init" if not cfg.address else "connect to Ray")
    if stop.requested:  # during start-up: nothing was leased or started
        return 0, 0, stop.signum
    workers, cpus = _resolve_resources(cfg)
    job = job_of(cfg, run, cpus)
    driver = _Driver(cfg, run, ledger, owner, phases, storage, listing, job, workers, cpus)
    try:
        driver.loop(stop)
    finally:
        driver.close()
    d = driver.dispatcher
    if d.failed:
        details = "; ".join(f"shard {k}: {why}" for k, why in sorted(d.failed.items())[:5])
        raise ShardsFailed(
            f"{len(d.failed)} shard(s) failed {cfg.max_attempts} times and were left pending ({details}). "
            "Fix the cause and rerun the same command: finished shards are kept."
        )
    return d.done, driver.rows_here, stop.signum


class _Driver:
    """The state the Ray shell keeps: the actors, the shard streams in flight, the records of
    finished shards waiting to be marked done, the heartbeat and the progress bar. Every
    decision is the ``Dispatcher``'s; each method here turns one kind of Ray event into its
    events, or carries out the actions it returns."""

    def __init__(self, cfg, run: Run, ledger: Ledger, owner: str, phases: Phases, storage: Storage, listing: str,
                 job: Job, workers: int, cpus: float):
        import ray
        from tqdm import tqdm

        from distill.embed.listing import ListingReader
        from distill.heartbeat import Heartbeat, interval
        from distill.shards.dispatch import Dispatcher

        self.cfg, self.run, self.ledger, self.owner, self.phases = cfg, run, ledger, owner, phases
        self.task, self.method = job.task, job.method
        self.actor_cls = ray.remote(job.worker).options(
            num_cpus=cpus, num_gpus=cfg.gpus_per_worker, resources=dict(cfg.worker_resources) or None,
            max_restarts=0, max_task_retries=0,
            # Threaded: a shard's Parquet encode + write overlaps the next shard's teacher batches.
            max_concurrency=PER_ACTOR_QUEUE,
        )
        self.dispatcher = Dispatcher(workers, PER_ACTOR_QUEUE, cfg.max_attempts)
        self.actors = [self.actor_cls.remote(self.task) for _ in range(workers)]
        self.starting = {a.ready.remote(): i for i, a in enumerate(self.actors)}  # ready ref -> slot
        self.streams: dict[Any, int] = {}  # generator -> shard
        self.stream_of: dict[int, Any] = {}
        self.records: dict[int, ShardRecord] = {}
        self.reader = ListingReader(listing)
        self.total = run.identity["rows"]
        self.beat = _Heartbeat(ledger, owner, cfg.lease_seconds)
        self.beat.start()
        self.rows_here, self.actor_started = 0, False
        self.last_manifest = time.monotonic()
        self.storage = storage
        bars, rows_before = show_progress(cfg.progress), self.rows_done(ledger.snapshot())
        self.bar = tqdm(total=self.total, initial=rows_before, unit="img", desc=job.name, disable=not bars,
                        dynamic_ncols=True, smoothing=0.05)
        # --heartbeat: the bar's news as a log line, when the bar is off (self.beat renews leases).
        self.job, self.pulse = job, Heartbeat(interval(cfg.heartbeat, bars), time.monotonic(), rows_before)

    def rows_done(self, state) -> int:
        return sum(shard_at(k, self.total, self.cfg.shard_size).rows for k in state.done)

    def say_progress(self) -> None:
        """Every --heartbeat seconds (progress bar off): shards and rows done by any driver, and
        the rows in flight here; the pace since the last line; the time left at it."""
        from distill.heartbeat import shards_line

        now = time.monotonic()
        if not self.pulse.due(now):
            return
        state, d = self.ledger.snapshot(), self.dispatcher
        rows = self.rows_done(state) + sum(d.rows.values())
        log.info("%s", shards_line(verb=self.job.name, shards_done=len(state.done), shards_total=self.run.num_shards,
                                   rows_done=rows, rows_total=self.total, images_per_sec=self.pulse.beat(now, rows),
                                   failed=len(d.failed), unit=self.job.unit))

    # -- carrying out the dispatcher's actions
    def apply(self, actions) -> None:
        from distill.shards.dispatch import Forget, MarkDone, Release, Replace, Submit

        for act in actions:
            if isinstance(act, Submit):
                shard = shard_at(act.k, self.total, self.cfg.shard_size)
                gen = getattr(self.actors[act.slot], self.method).options(num_returns="streaming").remote(
                    shard, self.reader.rows(shard.start, shard.stop))
                self.streams[gen], self.stream_of[act.k] = act.k, gen
            elif isinstance(act, Forget):
                self.streams.pop(self.stream_of.pop(act.k, None), None)
                self.bar.update(-act.rows)
            elif isinstance(act, Replace):
                import ray

                ray.kill(self.actors[act.slot], no_restart=True)
                self.actors[act.slot] = self.actor_cls.remote(self.task)
                self.starting[self.actors[act.slot].ready.remote()] = act.slot
            elif isinstance(act, MarkDone):
                self.mark_done(act.k)
            elif isinstance(act, Release):
                self.ledger.release(self.owner, list(act.ks))
        self.beat.track(self.dispatcher.held)

    def mark_done(self, k: int) -> None:
        record = self.records.pop(k)
        self.ledger.complete(self.owner, record)
        self.rows_here += record.rows + len(record.errors)
        if time.monotonic() - self.last_manifest > 60:
            finalize(self.storage, self.ledger, self.run)
            self.last_manifest = time.monotonic()

    # -- the loop
    def loop(self, stop: StopRequest) -> None:
        import ray

        d, cfg, grace_ends = self.dispatcher, self.cfg, None
        while True:
            self.say_progress()
            self.apply(d.lease_lost(self.beat.take_lost()))
            if stop.requested:
                if grace_ends is None:
                    grace_ends = time.monotonic() + cfg.stop_grace
                    d.drain()
                    log.warning("stopping: no new shards; %d in flight get up to %.0f s to finish",
                                len(d.running), cfg.stop_grace)
                if not d.busy():
                    return
                if time.monotonic() > grace_ends:
                    log.warning("stop grace over: releasing the %d shard(s) still in flight", len(d.running))
                    return
            elif want := d.wants():
                self.apply(d.leased(self.ledger.acquire(self.owner, want, cfg.lease_seconds, time.time())))
            state = None
            if not d.busy():
                # Nothing in flight: finished even if a replacement actor can never be placed
                # (its node died and no other node has the resources).
                state = self.ledger.snapshot()
                if len(state.done) + len(d.failed) >= self.run.num_shards:
                    return
            waiting_on = list(self.streams) + list(self.starting)
            if not waiting_on:
                # The rest is leased by other drivers: wait for them, or for their leases to expire.
                state = state or self.ledger.snapshot()
                self.bar.n = self.rows_done(state)
                self.bar.set_postfix_str(f"waiting on {self.run.num_shards - len(state.done)} shards leased elsewhere")
                time.sleep(min(2.0, cfg.lease_seconds / 3))
                continue
            ready, _ = ray.wait(waiting_on, num_returns=1, timeout=1.0)
            for item in ready:
                if item in self.starting:
                    self.actor_ready(item)
                elif item in self.streams:  # (not a stream forgotten with its dead actor)
                    self.stream_item(item)

    def actor_ready(self, ref) -> None:
        import ray

        slot = self.starting.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as e:  # its node died while it loaded the teacher
            log.warning("a teacher actor died while starting (%s); replacing it", _first_line(e))
            self.apply(self.dispatcher.start_failed(slot, _first_line(e)))
            return
        except ray.exceptions.RayError as e:  # the constructor raised: same for every actor
            raise TeacherError(f"a teacher actor failed to start: {_first_line(e)}") from e
        if not self.actor_started:  # (TensorFlow import and teacher load in the actor)
            self.phases.mark("teacher actor start")
            self.actor_started = True
        self.apply(self.dispatcher.ready(slot))

    def stream_item(self, gen) -> None:
        """The next value of a shard's stream: rows done (progress), its record, or its failure."""
        import ray

        k = self.streams[gen]
        try:
            value = ray.get(next(gen))
        except StopIteration:
            self.streams.pop(gen, None)
            return
        except (ray.exceptions.RayError, OSError, ValueError) as e:
            self.attempt_failed(k, e)
            return
        if isinstance(value, int):
            if not self.phases.reported:
                self.phases.mark("first rows")
                self.phases.reported = True
                log.debug("%s", self.phases.line())
            self.dispatcher.progress(k, value)
            self.bar.update(value)
            return
        self.records[k] = ShardRecord.from_json(value)
        self.streams.pop(gen, None)
        self.stream_of.pop(k, None)
        self.apply(self.dispatcher.finished(k))

    def attempt_failed(self, k: int, e: BaseException) -> None:
        import ray

        fix = storage_fix(e)
        if fix is not None:  # a full or read-only output: every shard would fail the same way
            raise StorageFull(
                f"cannot write shard {k} into {self.cfg.out}: {_first_line(e)}; {fix}. Kept: the "
                f"{len(self.ledger.snapshot().done)} shard(s) already done; nothing half-written"
            ) from e
        dead = isinstance(e, ray.exceptions.RayActorError)
        log.warning("shard %d attempt %d failed (%s): %s", k, self.dispatcher.attempts.get(k, 0) + 1,
                    "actor died" if dead else "error", _first_line(e))
        self.apply(self.dispatcher.failed_attempt(k, _first_line(e), actor_died=dead))

    def close(self) -> None:
        """Done, stopped, interrupted or crashed: hand back every lease still held (given-up
        shards; in-flight ones after a stop or a crash) so a rerun or another driver starts at
        once; stop the heartbeat and the actors."""
        import ray

        try:
            self.apply(self.dispatcher.stop())
        except Exception as e:  # an error in flight matters more; the leases expire anyway
            log.warning("could not release leases (%s); they expire in %.0f s", _first_line(e), self.cfg.lease_seconds)
        self.beat.stop.set()
        self.bar.close()
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1][:300] if text else type(e).__name__


def _init_ray(cfg: EmbedConfig, stop: StopRequest) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", **store_env()}  # (the actors write s3://... shards too)
    address = cfg.address or os.environ.get("RAY_ADDRESS")  # (what `ray job submit` sets)
    if address:
        log.info("connecting to Ray at %s", redact(address))
        start_ray(stop, address=address, runtime_env={"env_vars": env}, logging_level=logging.WARNING,
                  log_to_driver=False)
    else:
        start_ray(stop, include_dashboard=False, runtime_env={"env_vars": env}, logging_level=logging.WARNING,
                  log_to_driver=False)


def _resolve_resources(cfg: EmbedConfig) -> tuple[int, float]:
    """(actors, CPUs per actor) from the options and what the cluster has."""
    import ray

    res = ray.cluster_resources()
    if cfg.gpus_per_worker > 0:
        gpus = res.get("GPU", 0)
        if cfg.workers is None:
            if gpus < cfg.gpus_per_worker:
                raise BadOption(
                    f"--gpus-per-worker {cfg.gpus_per_worker:g} but the Ray cluster has {gpus:g} GPUs now; pass "
                    "--workers N to wait for an autoscaler to add them, or drop --gpus-per-worker to run on CPU"
                )
            return max(1, int(gpus // cfg.gpus_per_worker)), cfg.cpus_per_worker or 1.0
        if gpus < cfg.workers * cfg.gpus_per_worker:
            log.warning("the cluster has %g GPUs for %d actors; they start as the autoscaler adds nodes",
                        gpus, cfg.workers)
        return cfg.workers, cfg.cpus_per_worker or 1.0
    for name, amount in cfg.worker_resources:  # (an actor that asks for what no node has waits for ever)
        if res.get(name, 0) < amount:
            log.warning("--worker-resource %s=%g: the Ray cluster has %g of it now; the actors wait until a node "
                        "with it joins (an autoscaler's node type, or `ray start --resources`)", name, amount,
                        res.get(name, 0))
    workers = cfg.workers or 1
    cpus = cfg.cpus_per_worker or max(1.0, float(int(res.get("CPU", 1) // workers)))
    return workers, cpus


def check_resources(cpus_per_worker: float | None, gpus_per_worker: float) -> None:
    """The per-actor resources are amounts Ray can schedule (checked before Ray starts)."""
    if cpus_per_worker is not None and not cpus_per_worker > 0:
        raise BadOption(f"--cpus-per-worker must be positive, got {cpus_per_worker}")
    if not gpus_per_worker >= 0:
        raise BadOption(f"--gpus-per-worker must be >= 0 (0: CPU), got {gpus_per_worker}")


# ------------------------------------------------------------------ CLI


def _resource(text: str) -> tuple[str, float]:
    name, eq, amount = text.partition("=")
    try:
        value = float(amount) if eq else 1.0
    except ValueError:
        value = float("nan")
    if not name or not (name[0].isalpha() or name[0] == "_") or not value > 0:
        raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT (a resource name and an amount > 0, e.g. "
                                         f"node_type_a=1), got {text!r}")
    return name, value


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
    groups = add_options(p, EmbedConfig)
    groups["Ray"].add_argument(
        "--worker-resource", type=_resource, action="append", default=[], metavar="NAME=AMOUNT",
        help="custom Ray resource each actor needs (repeatable), e.g. to pin actors to node types")
    pre, g = Preprocessing(), groups[TEACHER_GROUP]
    g.add_argument("--pixel-mean", type=float, default=pre.pixel_mean, help=f"subtracted from 0..255 pixels (default: {pre.pixel_mean})")
    g.add_argument("--pixel-scale", type=float, default=pre.pixel_scale, help=f"then divided by this (default: {pre.pixel_scale})")
    g.add_argument("--channel-order", choices=CHANNEL_ORDERS, default=pre.channel_order, help=f"default: {pre.channel_order}")
    views, g = ViewSpec(), groups[STORED_GROUP]
    g.add_argument("--views", type=int, default=views.count, metavar="K",
                   help="also store the teacher's embedding of K augmented views of every image (random crop, "
                        "mirror, colour and grey jitter; see distill/views.py), which `distill train` re-renders "
                        f"bit-exactly and trains on (default: {views.count}; costs K more teacher calls per image)")
    g.add_argument("--view-seed", type=int, default=views.seed, help=f"seed of the views' parameters (default: {views.seed})")
    g.add_argument("--view-scale", type=_pair, default=views.scale, metavar="LO,HI",
                   help="crop side as a fraction of the image side (default: %s)" % ",".join(map(str, views.scale)))
    g.add_argument("--view-colour", type=float, default=1.0, metavar="F",
                   help="scales the brightness, contrast and saturation jitter (0: none; default: 1)")
    g.add_argument("--view-grey", type=float, default=views.grey, metavar="P",
                   help=f"probability of a grey view (default: {views.grey})")
    p.set_defaults(func=_main)


def config_from_args(a) -> EmbedConfig:
    return options_config(EmbedConfig, a, worker_resources=tuple(a.worker_resource),
                          preprocessing=Preprocessing(a.pixel_mean, a.pixel_scale, a.channel_order),
                          views=view_spec_from_args(a))


def _main(a) -> int:
    cfg = config_from_args(a)
    try:
        r = run_embed(cfg)
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
        print(f"  see `distill status {cfg.out} --errors` for the unreadable rows")
    if r.complete and r.errors > cfg.max_error_fraction * r.rows_total:
        from distill.shards.manifest import load_manifest

        first = "; ".join(f"{e['path']}: {e['reason']}" for e in load_manifest(cfg.out)["errors"][:3])
        print(f"distill embed: error: {r.errors} of {r.rows_total} rows ({100 * r.errors / r.rows_total:.0f}%) were "
              f"unreadable, more than --max-error-fraction {cfg.max_error_fraction:g} (the first: {first}). The "
              "shards are kept; fix the source, or pass --max-error-fraction 1 to accept the run", file=sys.stderr)
        return 1
    return 0 if r.complete else 1
