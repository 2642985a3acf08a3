"""``distill align SOURCE... --out DIR``: raw photos -> aligned 112x112 faces, resumable.

Every pipeline starts here when its photos are not aligned: a face fed to the teacher
squashed (a 500x375 photo stretched to 112x112) is badly hurt. For every photo of the
sources (identity folders, flat folders, list files: ``distill listing``'s), the main face is
found (MTCNN, or another detector by path; or the landmarks given in a file), warped onto
insightface's 5-point template by a similarity transform (``distill.embed.faces``) and
written as a JPEG under ``DIR`` at the photo's own relative path, in the same identity
layout, ready for ``distill listing DIR``; with ``--rec`` also ``DIR/train.rec`` + ``.idx`` +
``property`` (insightface's layout, for insightface and arcface_torch).

It is the same kind of job as the teacher pass, and runs on the same machinery: the listing
(``DIR/.align/listing.parquet``) is planned into shards, Ray actors
(``distill.workers.align_actor``) take them through the same ledger and dispatcher, and a
shard is done once its faces and its record file (``DIR/.align/part-NNNNN.parquet``: source,
output, box, 5 points, confidence per face) are durable; ``DIR/.align/manifest.json`` is
written last and lists the photos that gave no face, with the reason. Kill it, rerun the
same command: every photo is aligned once, with the same bytes. ``distill status DIR/.align``
shows its progress.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field

from distill.errors import BadInput, BadOption, ShardsFailed
from distill.heartbeat import DEFAULT_EVERY as HEARTBEAT
from distill.options import add_options, config_from_args, option

log = logging.getLogger(__name__)

RECORDS = ".align"  # hidden: `distill listing OUT` reads the faces, not the records


@dataclass(frozen=True)
class AlignConfig:
    """The options of ``distill align`` (the CLI is derived from these fields)."""

    sources: tuple[str, ...] = option(help="photos: identity folders, flat folders or list files (as `distill listing` "
                                      "reads them)", positional=True, metavar="SOURCE", path=True)
    out: str = option(help="the aligned faces' folder (records, manifest and ledger in OUT/.align)", required=True, path=True, metavar="DIR")
    size: int = option(112, "side of the aligned crops (the 5-point template, scaled)", group="alignment")
    all_faces: bool = option(False, "keep every face of a photo (its k-th as NAME_k.jpg), not only the main one",
                             group="alignment")
    detector: str = option("mtcnn", "mtcnn (the PyPI package, weights inside), or package.module:factory for "
                           "another (a callable returning a detector)", group="alignment")
    landmarks: str | None = option(None, "align by the 5 landmarks given in this file instead of detecting: CelebA's "
                                   "list_landmarks_*.txt layout, or a face2rec2 .lst with bbox and landmarks",
                                   metavar="FILE", group="alignment", path=True)
    quality: int = option(95, "JPEG quality of the aligned faces", group="alignment")
    rec: bool = option(False, "also write OUT/train.rec, train.idx and property (insightface's layout)",
                       group="alignment")
    shard_size: int = option(256, "photos per shard", group="plan")
    workers: int | None = option(None, "align actors (default: 1)", group="Ray")
    cpus_per_worker: float | None = option(None, "CPUs per actor (default: the cluster's CPUs / workers)", group="Ray")
    gpus_per_worker: float = option(0.0, "GPUs per actor", group="Ray")
    address: str | None = option(None, "existing Ray cluster (default: RAY_ADDRESS when set, else a local one)",
                                 group="Ray")
    worker_resources: tuple[tuple[str, float], ...] = field(default=())
    ledger: str = option("file", "'file' (in OUT/.align) or redis://[:PASSWORD@]HOST:PORT/DB", group="ledger")
    lease_seconds: float = option(60.0, "lease lifetime; renewed every third", group="ledger")
    max_attempts: int = option(3, "tries per shard before it is left pending", group="ledger")
    stop_grace: float = option(30.0, "on SIGTERM / SIGINT: seconds the shards in flight get to finish", group="ledger")
    progress: bool | None = option(None, "progress bar (default: on a terminal only)")
    heartbeat: float = option(HEARTBEAT, "with the progress bar off (not a terminal, or --no-progress): log the "
                              "shards and photos done, img/s and ETA every this many seconds; 0: never",
                              metavar="SECONDS")

    def __post_init__(self) -> None:
        if not 32 <= self.size <= 1024:
            raise BadOption(f"--size must be between 32 and 1024, got {self.size}")
        if not 1 <= self.quality <= 100:
            raise BadOption(f"--quality is a JPEG quality in [1, 100], got {self.quality}")
        for name in ("shard_size", "max_attempts"):
            if getattr(self, name) < 1:
                raise BadOption(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lease_seconds < 3:
            raise BadOption(f"--lease-seconds must be >= 3 (heartbeats renew at a third of it), got {self.lease_seconds}")
        if self.stop_grace < 0:
            raise BadOption(f"--stop-grace must be >= 0 seconds, got {self.stop_grace}")
        from distill.embed.sharded import check_resources
        from distill.heartbeat import check_every

        check_resources(self.cpus_per_worker, self.gpus_per_worker)
        check_every(self.heartbeat)
        if self.workers is not None and self.workers < 1:
            raise BadOption(f"--workers must be >= 1, got {self.workers}")


@dataclass(frozen=True)
class AlignReport:
    out: str
    photos: int
    faces: int
    no_face: int
    unreadable: int
    shards_done: int
    shards_total: int
    seconds: float
    complete: bool
    rec: str | None = None


# ---------------------------------------------------------------- pure parts


def parse_landmarks(text: str, where: str) -> dict[str, tuple[float, ...]]:
    """File name -> 10 numbers, from CelebA's ``list_landmarks_*.txt`` (a count line, a header
    line, then ``NAME x1 y1 ... x5 y5``) or a face2rec2 ``.lst`` whose lines carry a bbox and 5
    landmarks (``aligned<TAB>path<TAB>label<TAB>x0 y0 x1 y1<TAB>x1 y1 ... x5 y5``). Pure."""
    out: dict[str, tuple[float, ...]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.replace("\t", " ").split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) == 11:  # CelebA: name and 10 numbers
            name, numbers = parts[0], parts[1:]
        elif len(parts) == 17 and parts[0] in ("0", "1"):  # face2rec2: flag, path, label, bbox, landmarks
            name, numbers = os.path.basename(parts[1]), parts[7:]
        elif lineno <= 2:
            continue  # CelebA's count and header lines
        else:
            raise BadOption(f"{where}:{lineno}: not a landmarks line; expected `NAME x1 y1 ... x5 y5` (CelebA) or a "
                            "face2rec2 .lst line with its bbox and 5 landmarks")
        try:
            out[name] = tuple(float(v) for v in numbers)
        except ValueError:
            raise BadOption(f"{where}:{lineno}: landmarks must be numbers") from None
    if not out:
        raise BadOption(f"{where} holds no landmarks")
    return out


def source_roots(info) -> tuple[tuple[int, str, str], ...]:
    """(first row, root, prefix) of each source of a listing: a folder is its own root, a list
    file's folder the root of its paths; with several sources each gets its folder's name as
    a prefix, so their outputs do not meet. Pure."""
    parts = [(p.first_row, p.kind, p.source) for p in info.parts] or [(0, info.kind, info.source)]
    many = len(parts) > 1
    out = []
    for first, kind, source in parts:
        root = source if kind in ("folders", "flat") else os.path.dirname(source)
        out.append((int(first), root, os.path.basename(source.rstrip("/")) if many else ""))
    return tuple(out)


def detector_identity(spec: str) -> str:
    """What decides the detections, for the run's identity: the spec and the package's version."""
    from importlib import metadata

    if spec != "mtcnn":
        return spec
    try:
        return f"mtcnn {metadata.version('mtcnn')}"
    except metadata.PackageNotFoundError:
        raise BadOption("the MTCNN detector needs the `mtcnn` package: pip install 'distill[align]' (or pip install "
                        "mtcnn); its weights ship in the wheel, nothing is downloaded") from None


# ---------------------------------------------------------------- the run


def resolve(cfg: AlignConfig):
    """The listing of the sources (rebuilt, atomically), the landmarks, and the run's identity."""
    from distill.embed.listing import ListingConfig, build_listing, listing_fingerprint
    from distill.outputs import ALIGNED, check_output
    from distill.storage import local_path, make_dir

    out = local_path(cfg.out, "--out")
    check_output(out, ALIGNED, [("SOURCE", s) for s in cfg.sources] + [("--landmarks", cfg.landmarks)])
    records = make_dir(os.path.join(out, RECORDS))
    listing = os.path.join(records, "listing.parquet")
    info = build_listing(ListingConfig(cfg.sources, listing))
    if info.kind == "rec" or (info.rec and info.parts):
        raise BadOption("distill align reads photos from folders and list files, not a .rec pack (its images are "
                        "already aligned crops); list the .rec with `distill listing`")
    landmarks, lm_fp = None, None
    if cfg.landmarks:
        with open(cfg.landmarks, encoding="utf-8", errors="replace") as f:
            text = f.read()
        landmarks, lm_fp = parse_landmarks(text, cfg.landmarks), hashlib.sha256(text.encode()).hexdigest()[:16]
    identity = {
        # (The listing beside the manifest: named relative to it, so two outputs of one run match.)
        "kind": "align", "listing": "listing.parquet", "listing_fingerprint": listing_fingerprint(listing),
        "rows": info.rows,
        "detector": "given landmarks" if landmarks else detector_identity(cfg.detector),
        "landmarks_fingerprint": lm_fp, "size": cfg.size, "all_faces": cfg.all_faces, "quality": cfg.quality,
        "shard_size": cfg.shard_size, "sources": [os.path.abspath(s) for s in cfg.sources],
        "num_classes": info.num_classes, "label_names": list(info.label_names) if info.label_names else None,
        "unlabelled": info.unlabelled,
    }
    return identity, info, landmarks, out, records


def run_align(cfg: AlignConfig) -> AlignReport:
    from distill.stopping import StopRequest

    # SIGTERM / SIGINT from the first moment on stop cleanly, start-up included.
    with StopRequest("the align pass") as stop:
        return _run_align(cfg, stop)


def _run_align(cfg: AlignConfig, stop) -> AlignReport:
    from distill.embed.sharded import PassOptions, run_pass
    from distill.startup import Phases

    t0 = time.perf_counter()
    identity, info, landmarks, out, records = resolve(cfg)
    align = align_pass(cfg, identity, info, landmarks, out, records)
    done = run_pass(align, PassOptions.of(cfg), stop, Phases())
    manifest = done.manifest
    rec = write_rec(out, done.storage, manifest, info) if cfg.rec and manifest["complete"] else None
    errors = manifest["errors"]
    no_face = sum(e["reason"] == "no face found" for e in errors)
    return AlignReport(out=out, photos=info.rows, faces=manifest["rows_done"], no_face=no_face,
                       unreadable=len(errors) - no_face, shards_done=len(manifest["shards"]),
                       shards_total=align.num_shards, seconds=time.perf_counter() - t0, complete=manifest["complete"],
                       rec=rec)


def align_pass(cfg: AlignConfig, identity: dict, info, landmarks, out: str, records: str):
    """The align pass as a ``ShardedPass``: its actors write each shard's faces under OUT and its
    record file (``distill.shards.records``) under OUT/.align, beside the manifest and ledger."""
    from distill.embed.sharded import Job, ShardedPass
    from distill.shards.manifest import run_id
    from distill.shards.plan import num_shards
    from distill.workers.align_actor import AlignTask, AlignWorker

    rid = run_id(identity)

    def job(cpus: float) -> Job:
        task = AlignTask(out=out, records=records, run_id=rid, detector=cfg.detector, size=cfg.size,
                         all_faces=cfg.all_faces, quality=cfg.quality, roots=source_roots(info),
                         landmarks=tuple(sorted(landmarks.items())) if landmarks else (), threads=max(1, int(cpus)))
        return Job(AlignWorker, task, "align_shard", "align", actor="align actor", start_error=BadInput)

    return ShardedPass(identity, rid, num_shards(info.rows, cfg.shard_size), os.path.join(records, "listing.parquet"),
                       records, job, verb="aligning", unit="photos")


def write_rec(out: str, storage, manifest: dict, info) -> str:
    """``OUT/train.rec`` + ``train.idx`` + ``property`` from the aligned faces, identity by
    identity in label order (the unlabelled ones, which belong to no identity, are left out),
    written under temp names and renamed into place."""
    import numpy as np

    from distill.embed.listing import ListingReader
    from distill.embed.recordio import write_insightface_rec
    from distill.shards.records import read_records
    from distill.storage import temp_name

    outputs, index = [], []
    for s in sorted(manifest["shards"], key=lambda s: s["k"]):
        t = read_records(storage, s["name"], ["index", "output"])
        index.extend(t.column("index").to_pylist())
        outputs.extend(t.column("output").to_pylist())
    with ListingReader(os.path.join(out, RECORDS, "listing.parquet")) as reader:
        labels = reader.rows(0, len(reader)).label
    label_of = np.asarray(labels)[np.asarray(index, np.int64)] if index else np.zeros(0, np.int64)
    groups = [[] for _ in range(info.num_classes)]
    for lab, name in zip(label_of.tolist(), outputs):
        if lab >= 0:
            groups[lab].append(name)
    left_out = int((label_of < 0).sum())
    if left_out:
        log.info("--rec: %d unlabelled faces are not in train.rec (its records are identities)", left_out)
    stage = os.path.join(out, temp_name("rec"))
    # Each face is read as it is packed (a callable per image), so a pack of millions fits in memory.
    write_insightface_rec(stage, [[_reader(os.path.join(out, n)) for n in g] for g in groups],
                          height=manifest["size"], width=manifest["size"])
    for name in ("train.rec", "train.idx", "property"):
        os.replace(os.path.join(stage, name), os.path.join(out, name))
    os.rmdir(stage)
    return os.path.join(out, "train.rec")


def _reader(path: str):
    def read() -> bytes:
        with open(path, "rb") as f:
            return f.read()
    return read


# ---------------------------------------------------------------- CLI


def add_cli(sub) -> None:
    p = sub.add_parser(
        "align", help="detect and align the faces of raw photos onto the 5-point template (resumable)",
        description="Find each photo's main face (MTCNN, or the landmarks given), warp it onto insightface's 5-point "
                    "template and write it under OUT in the same identity layout, on Ray actors through the shard "
                    "plan and ledger: rerun the same command after any interruption to resume.",
    )
    add_options(p, AlignConfig)
    p.set_defaults(func=_main)


def _main(args) -> int:
    cfg = config_from_args(AlignConfig, args)
    try:
        r = run_align(cfg)
    except ShardsFailed as e:
        print(f"distill align: {e}")
        return 1
    state = "complete" if r.complete else "INCOMPLETE"
    print(f"align {state}: {r.faces} faces from {r.photos} photos in {r.shards_done}/{r.shards_total} shards; "
          f"{r.no_face} without a face, {r.unreadable} unreadable ({r.seconds:.1f} s) -> {r.out}")
    if r.no_face or r.unreadable:
        print(f"  see `distill status {os.path.join(r.out, RECORDS)} --errors` for them")
    if r.rec:
        print(f"  insightface pack: {r.rec}")
    print(f"next: distill listing {r.out} --out {os.path.join(os.path.dirname(r.out.rstrip('/')), 'listing.parquet')}")
    return 0 if r.complete else 1
