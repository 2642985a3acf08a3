"""The teacher pass, ``distill embed``: listing -> shard plan -> Ray actors -> Parquet shards + manifest.

What is the teacher pass's own lives here: its options, the run resolved and checked before
Ray starts (listing, teacher, options: the identity its manifest records), and its job (the
teacher actors of ``workers.embed_actor``). The exactly-once machinery it runs on, the same for
``distill align``, is ``distill.embed.sharded``: kill the pass at any point and rerun the same
command; done shards are kept, leased ones come back, every row is embedded once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace

from distill.embed.sharded import check_resources
from distill.errors import BadInput, BadOption, ShardsFailed
from distill.heartbeat import DEFAULT_EVERY as HEARTBEAT
from distill.heartbeat import check_every
from distill.options import add_options, option
from distill.options import config_from_args as options_config
from distill.outputs import SHARDS, check_output
from distill.shards.format import EMBEDDING_DTYPES
from distill.shards.manifest import read_manifest, run_id
from distill.shards.plan import num_shards
from distill.startup import Phases, versions
from distill.stopping import StopRequest
from distill.storage import is_uri, open_storage, redact
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
    teacher: str = option(help="the teacher: a TensorFlow SavedModel directory or an ONNX file (run by onnxruntime: "
                               "pip install 'distill[onnx]'), or an object-store URI of either (each actor fetches it "
                               "once into its node's cache and checks its fingerprint)", path=True, metavar="DIR|MODEL.onnx")
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
    signature: str = option("serving_default", "SavedModel signature (an ONNX teacher has one graph)", group=TEACHER_GROUP)
    teacher_output: str | None = option(None, "the output holding the embedding (default: the only one, else the one "
                                        "named *embed*)",
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
    from distill.teacher import fetch_teacher, inspect_teacher, require_onnxruntime, teacher_fingerprint

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
    if spec.format == "onnx":
        require_onnxruntime(cfg.teacher)
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
        "teacher_format": spec.format,  # (its fingerprint is the run's: format and layout are the file's)
        "teacher_signature": _signature_record(spec),
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


def _signature_record(spec: TeacherSpec) -> dict:
    """How the manifest records the teacher's input and output (and an ONNX input's layout)."""
    if spec.format == "onnx":
        return {"input": spec.input_name, "output": spec.output_name, "layout": spec.layout}
    return {"name": spec.signature, "input": spec.input_name, "output": spec.output_name}


def _spec_from_manifest(cfg: EmbedConfig, teacher_fp: str) -> TeacherSpec | None:
    """The teacher's input and output as an earlier run into ``--out`` read them, when the
    teacher's files are byte-identical: a resume then skips reading the model again."""
    try:
        m = read_manifest(open_storage(cfg.out, create=False))
    except (FileNotFoundError, BadInput):  # no usable earlier manifest: inspect the teacher instead
        return None
    if not m or m.get("teacher_fingerprint") != teacher_fp:
        return None
    sig, form = m["teacher_signature"], m.get("teacher_format", "savedmodel")
    if (form == "savedmodel" and sig["name"] != cfg.signature) or cfg.teacher_output not in (None, sig["output"]):
        return None
    h, w = m["input_size"]
    return TeacherSpec(_teacher_location(cfg.teacher), sig.get("name", ""), sig["input"], sig["output"], h, w, 3,
                       m["embedding_dim"], form, sig.get("layout", "NHWC"))


def _teacher_location(teacher: str) -> str:
    return teacher.rstrip("/") if is_uri(teacher) else os.path.abspath(teacher)


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


# ------------------------------------------------------------------ the run


def run_embed(cfg: EmbedConfig) -> EmbedReport:
    # SIGTERM / SIGINT from the first moment on stop cleanly (a preemption notice can come
    # during start-up too): nothing new is started, what is done is kept and written down.
    with StopRequest("the teacher pass") as stop:
        return _run_embed(cfg, stop)


def _run_embed(cfg: EmbedConfig, stop: StopRequest) -> EmbedReport:
    from distill.embed.sharded import PassOptions, run_pass

    t0 = time.perf_counter()
    phases = Phases()
    check_output(cfg.out, SHARDS, {"LISTING": cfg.listing, "--teacher": cfg.teacher})
    run = resolve_run(cfg, phases)
    done = run_pass(teacher_pass(cfg, run), PassOptions.of(cfg), stop, phases,
                    before_drive=lambda: warn_if_not_aligned(run.listing, run.spec.height, run.spec.width))
    seconds, manifest = time.perf_counter() - t0, done.manifest
    return EmbedReport(
        out=done.storage.root,
        rows_total=run.identity["rows"],
        rows_done=manifest["rows_done"],
        errors=manifest["error_count"],
        shards_total=run.num_shards,
        shards_done=len(manifest["shards"]),
        shards_this_run=done.shards_here,
        rows_this_run=done.rows_here,
        seconds=seconds,
        images_per_second=done.rows_here / seconds if seconds > 0 else 0.0,
        complete=manifest["complete"],
    )


def teacher_pass(cfg: EmbedConfig, run: Run):
    """The teacher pass as a ``ShardedPass``: its actors embed each shard's rows into a shard file."""
    from distill.embed.sharded import Job, ShardedPass
    from distill.workers.embed_actor import EmbedTask, EmbedWorker

    def job(cpus: float) -> Job:
        task = EmbedTask(
            teacher=run.spec, pre=cfg.preprocessing, out=cfg.out, run_id=run.run_id, batch_size=cfg.batch_size,
            flip=cfg.flip, views=cfg.views, dtype=cfg.dtype, images=cfg.images, paths=run.paths, rec=run.rec,
            threads=max(1, int(cpus)), gpus=cfg.gpus_per_worker, decode_threads=cfg.decode_threads or max(4, int(cpus)),
            teacher_fingerprint=run.identity["teacher_fingerprint"],
        )
        return Job(EmbedWorker, task, "embed_shard", "embed", actor="teacher actor", start_error=TeacherError)

    return ShardedPass(run.identity, run.run_id, run.num_shards, run.listing, cfg.out, job, verb="embedding",
                       verify=cfg.verify)


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
