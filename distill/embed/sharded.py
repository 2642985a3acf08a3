"""The sharded pass: the exactly-once machinery every pass over a listing runs (the teacher
pass, ``distill embed``; the face alignment, ``distill align``; any later one).

A pass is a ``ShardedPass``: its identity (what the manifest records; its hash is the run id),
its shard plan, the listing it reads, where its shard files go, and the ``Job`` its Ray actors
run over one shard (rows done after each batch, then the shard's done record). ``run_pass``
does the rest, the same for every pass: opens the ledger (Redis before anything is written to
the output, so a bad URL leaves it as it was) and the output (refusing another run's), makes
the ledger agree with the files (``reconcile``), leases shards and feeds them to the actors
(``_Driver``, the Ray shell around ``distill.shards.dispatch.Dispatcher``, which makes every
decision), renews its leases while they work, marks shards done once their files are durable,
and writes ``manifest.json`` last. Kill it at any point and rerun the same command: done shards
are kept, leased ones come back, every row is done once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, fields
from typing import Any, Callable

from distill.errors import BadOption, DistillError, ShardsFailed, Stopped, StorageFull, storage_fix
from distill.shards.format import ShardRecord
from distill.shards.ledger import Ledger, new_owner, open_ledger
from distill.shards.manifest import build_manifest, check_compatible, read_manifest, write_manifest
from distill.shards.plan import parse_shard_name, shard_at, shard_name
from distill.shards.reconcile import adopt_file, plan_reconcile, shard_files
from distill.startup import Phases, show_progress
from distill.stopping import StopRequest, start_ray
from distill.storage import Storage, is_temp_name, open_storage, redact, store_env

log = logging.getLogger(__name__)

PER_ACTOR_QUEUE = 2  # one shard on the actor's model, one writing its file or waiting its turn


@dataclass(frozen=True)
class Job:
    """What the actors of a pass run: the worker class (a plain class, wrapped in ``ray.remote``
    here), the task it is built with, and its generator method over one shard (rows done after
    each batch, then the shard's done record, ``ShardRecord.to_json``)."""

    worker: type
    task: Any
    method: str
    name: str  # for the progress bar, the heartbeat and the log
    actor: str = "actor"  # what the log calls one actor ("teacher actor")
    start_error: type[DistillError] = DistillError  # raised when an actor's constructor fails (the same for all)


@dataclass(frozen=True)
class ShardedPass:
    """One pass over a listing's shards, as resolved and checked (no Ray, nothing written)."""

    identity: dict  # what the manifest records (``rows`` among it); its hash is ``run_id``
    run_id: str
    num_shards: int
    listing: str  # the listing's local path: the driver reads each shard's rows from it
    location: str  # where the shard files, the manifest and the file ledger go
    job: Callable[[float], Job]  # the actors' job, given the CPUs each actor holds
    verb: str = "processing"  # "embedding", "aligning": the log line before the actors start
    unit: str = "rows"  # what a listing row is ("photos"), in the log and the heartbeat
    verify: bool = False  # sha256 of every done shard at the start (``--verify``)

    @property
    def rows(self) -> int:
        return self.identity["rows"]


@dataclass(frozen=True)
class PassOptions:
    """What every pass takes from its command line (the fields of the same names of its config):
    where Ray is, how many actors of what size, the ledger and its leases, the stop, progress."""

    out: str  # the command's --out (named in a full-disk refusal)
    shard_size: int
    workers: int | None
    cpus_per_worker: float | None
    gpus_per_worker: float
    address: str | None
    worker_resources: tuple
    ledger: str
    lease_seconds: float
    max_attempts: int
    stop_grace: float
    progress: Any
    heartbeat: float

    @classmethod
    def of(cls, cfg) -> "PassOptions":
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class PassResult:
    storage: Storage
    manifest: dict
    shards_here: int  # finished by this driver
    rows_here: int


def run_pass(p: ShardedPass, opts: PassOptions, stop: StopRequest, phases: Phases,
             before_drive: Callable[[], None] | None = None) -> PassResult:
    """The pass, from ledger and output to the manifest; ``Stopped`` after SIGTERM / SIGINT
    (what is done is kept, leases released), ``ShardsFailed`` when shards were given up."""
    # A ledger elsewhere (Redis) is reached before anything is written to the output: a bad
    # URL or an unreachable server leaves it as it was.
    ledger = None if opts.ledger in ("", "file") else open_ledger(opts.ledger, p.location, p.num_shards, p.run_id)
    try:
        storage = open_output(p)
        ledger = ledger or open_ledger(opts.ledger, p.location, p.num_shards, p.run_id)
    except BaseException:
        if ledger is not None:
            ledger.close()
        raise
    owner = new_owner()
    shards_here = rows_here = 0
    stopped_by = None
    try:
        reconcile(storage, ledger, owner, p, opts.lease_seconds, verify=p.verify)
        phases.mark("output and ledger")
        state = ledger.snapshot()
        if len(state.done) < p.num_shards and not stop.requested:
            log.info("%s %d %s into %s: %d of %d shards done, ledger: %s", p.verb, p.rows, p.unit,
                     opts.out, len(state.done), p.num_shards, ledger.describe())
            if before_drive is not None:
                before_drive()
            shards_here, rows_here, stopped_by = _drive(p, opts, ledger, owner, phases, storage, stop)
        manifest = finalize(storage, ledger, p)
        stopped_by = stopped_by or stop.signum
        if stopped_by is not None:
            raise Stopped(
                f"stopped: {manifest['rows_done']}/{p.rows} rows in {len(manifest['shards'])}/{p.num_shards} shards "
                "are done and kept, leases released; rerun the same command to resume", stopped_by)
    finally:
        ledger.close()
    return PassResult(storage, manifest, shards_here, rows_here)


def open_output(p: ShardedPass) -> Storage:
    """The shard storage with the pass's manifest: refused when it holds another run's, written
    (no shards yet) when it holds none."""
    storage = open_storage(p.location)
    existing = read_manifest(storage)
    if existing is not None:
        check_compatible(existing, p.identity, storage.root)
    else:
        write_manifest(storage, build_manifest(p.identity, [], p.num_shards))
    return storage


def reconcile(storage: Storage, ledger: Ledger, owner: str, run: ShardedPass, lease_seconds: float,
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
            log.warning("%s does not match its record (%s): removing it; it will be redone", storage.uri(m.name), m.why)
            storage.remove(m.name)
        if bad:
            ledger.forget(sorted(parse_shard_name(m.name) for m in bad))
        log.info("verified %d done shard(s): %d to redo", len(kept), len(bad))
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


def finalize(storage: Storage, ledger: Ledger, run: ShardedPass) -> dict:
    state = ledger.snapshot()
    manifest = build_manifest(run.identity, state.done.values(), run.num_shards)
    write_manifest(storage, manifest)
    return manifest


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


def _drive(run: ShardedPass, cfg: PassOptions, ledger: Ledger, owner: str, phases: Phases, storage: Storage,
           stop: StopRequest) -> tuple[int, int, int | None]:
    """Lease, dispatch, collect: the Ray shell around ``shards.dispatch.Dispatcher``, which
    makes every decision. Returns (shards, rows) finished by this driver and the signal
    that stopped it early (SIGTERM / SIGINT: nothing new is leased or submitted, the shards in
    flight get ``--stop-grace`` seconds), or None."""
    _init_ray(cfg, stop)  # (a signal meanwhile: a stop request, not Ray's exit)
    phases.mark("ray.init" if not cfg.address else "connect to Ray")
    if stop.requested:  # during start-up: nothing was leased or started
        return 0, 0, stop.signum
    workers, cpus = _resolve_resources(cfg)
    driver = _Driver(cfg, run, ledger, owner, phases, storage, run.job(cpus), workers, cpus)
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

    def __init__(self, cfg: PassOptions, run: ShardedPass, ledger: Ledger, owner: str, phases: Phases,
                 storage: Storage, job: Job, workers: int, cpus: float):
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
        self.reader = ListingReader(run.listing)
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
                                   failed=len(d.failed), unit=self.run.unit))

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
            said = ray.get(ref)
        except ray.exceptions.RayActorError as e:  # its node died while it loaded its model
            log.warning("a %s died while starting (%s); replacing it", self.job.actor, _first_line(e))
            self.apply(self.dispatcher.start_failed(slot, _first_line(e)))
            return
        except ray.exceptions.RayError as e:  # the constructor raised: same for every actor
            raise self.job.start_error(f"a {self.job.actor} failed to start: {_first_line(e)}") from e
        if not self.actor_started:  # (imports and model load in the actor)
            self.phases.mark(f"{self.job.actor} start")
            self.actor_started = True
            if isinstance(said, str):  # what the actor runs on, in its words
                log.info("%s ready: %s", self.job.actor, said)
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


def _init_ray(cfg: PassOptions, stop: StopRequest) -> None:
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


def _resolve_resources(cfg: PassOptions) -> tuple[int, float]:
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
