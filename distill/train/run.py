"""Train the student on the shards: ``distill train RUN/shards --out RUN/student``.

Owns the command and the choice of mode: the default strategy on CPU, MirroredStrategy over
the GPUs of one node, or ``--workers N`` Ray Train workers (``workers/train_worker.py``).
Every mode runs the same loop (``distill/train/loop.py``) on the same resolved config
(``distill/train/config.py``).

A checkpoint (``distill/train/checkpoints.py``: weights, optimizer state and the data cursor) is
saved every ``--checkpoint-every`` steps and at each epoch end. Rerunning the same command
resumes at the exact sample; a rerun that would change the order or the architecture is
refused and told why.

Hands on: ``RUN/student/checkpoints/ckpt-*`` (read by ``export``), ``metrics.jsonl`` (one
object per logged step and per epoch), TensorBoard logs in ``tb/``, and with
``--trace-samples`` ``trace.jsonl`` (the listing indices of every step; a debugging aid).
``--out`` may be on an object store (``s3://...``): the run works in a local copy and pushes
each checkpoint, ``best/`` and the logs to the store as it goes (``distill/mirror.py``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from distill.errors import BadInput, BadOption, Stopped
from distill.options import add_options, config_from_args
from distill.outputs import STUDENT, check_output
from distill.startup import import_tensorflow_quietly, show_progress
from distill.storage import is_uri, local_path, make_dir, redact
from distill.train.checkpoints import CHECKPOINTS, LocalCheckpoints, latest_checkpoint, read_checkpoint
from distill.train.config import TrainConfig, TrainReport, check_resume, objective_changes, resolve, views_note

__all__ = ["TrainConfig", "TrainReport", "run_train", "add_cli"]

VERIFIED = "shards-verified.json"
log = logging.getLogger(__name__)


def check_shards(location: str, out: str, progress: bool | None = None) -> None:
    """Refuse damaged shards before any training: every file's size and sha256 against the
    manifest, each file read once (``OUT/shards-verified.json`` keeps what was verified)."""
    from tqdm import tqdm

    from distill.shards.manifest import load_manifest
    from distill.shards.verify import check, from_manifest, read_cache, write_cache
    from distill.storage import open_storage

    expected = from_manifest(load_manifest(location))
    cache_path = os.path.join(out, VERIFIED)
    with tqdm(total=sum(e.bytes for e in expected), unit="B", unit_scale=True, desc="verify shards",
              disable=not show_progress(progress), dynamic_ncols=True, leave=False) as bar:
        storage = open_storage(location, create=False)
        bad, verified = check(storage, expected, checksum=True, cache=read_cache(cache_path), progress=bar.update)
    if bad:
        more = f" (and {len(bad) - 1} more: {', '.join(m.name for m in bad[1:4])})" if len(bad) > 1 else ""
        raise BadInput(f"{storage.uri(bad[0].name)}: {bad[0].why}{more}; the shard is damaged. Re-embed it: rerun "
                       f"the `distill embed` command of {location} with --verify (or restore the file from a copy)")
    write_cache(cache_path, verified)


def _local_strategy(cfg: TrainConfig):
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if cfg.use_gpu and not gpus:
        raise BadOption("--use-gpu given but TensorFlow sees no GPU here; drop --use-gpu to train on the CPU")
    if not cfg.use_gpu and gpus:
        tf.config.set_visible_devices([], "GPU")  # asked for CPU: keep TF off the GPUs
        gpus = []
    for g in gpus:
        tf.config.experimental.set_memory_growth(g, True)
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def run_train(cfg: TrainConfig) -> TrainReport:
    """Train (or resume) to ``cfg.epochs`` / ``cfg.max_steps``; the public entry point."""
    from distill.stopping import StopRequest

    # SIGTERM / SIGINT from the first moment on stop cleanly, start-up included.
    with StopRequest("training") as stop:
        return _run_train(cfg, stop)


def _file_is_there(path: str) -> bool:
    """A local file, or an object on a store (a --val-bin in the bucket: read where it is)."""
    if is_uri(path):
        from distill.storage import retrying, store_file_exists

        return retrying(lambda: store_file_exists(path), f"looking up {redact(path)}")
    return os.path.isfile(path)


def _check_init(cfg: TrainConfig) -> None:
    """``--init`` names weights that are there (the checkpoint found as training will find it)."""
    if not cfg.init or cfg.backbone_weights:
        return
    if cfg.init.endswith((".h5", ".hdf5", ".keras")):
        if not _file_is_there(cfg.init):
            raise BadOption(f"--init {redact(cfg.init)}: no such file")
        return
    from distill.train.checkpoints import find_checkpoint

    if not os.path.isdir(cfg.init):
        raise BadOption(f"--init {cfg.init}: no such folder; pass a `distill train` output, one of its checkpoints, a "
                        "`distill export` directory, or a Keras .h5 weights file")
    find_checkpoint(cfg.init)


def _run_train(cfg: TrainConfig, stop) -> TrainReport:
    from distill.shards.reader import open_shards

    cfg = replace(cfg, out=cfg.out if is_uri(cfg.out) else local_path(cfg.out, "--out"),
                  shards=cfg.shards if is_uri(cfg.shards) else os.path.abspath(cfg.shards))
    # Refuse bad shards, options, paths or an incompatible resume before TensorFlow or Ray start.
    check_output(cfg.out, STUDENT, [("SHARDS", cfg.shards), ("--init", cfg.init), ("--val-folders", cfg.val_folders)]
                 + [("--val-bin", p) for _, p in cfg.val_bins])
    for option_name, path, is_there in [("--val-folders", cfg.val_folders, os.path.isdir)] + [
            ("--val-bin", p, _file_is_there) for _, p in cfg.val_bins]:
        if path and not is_there(path):
            raise BadOption(f"{option_name} {redact(path)}: no such {'folder' if is_there is os.path.isdir else 'file'}")
    _check_init(cfg)
    config = resolve(cfg, open_shards(cfg.shards))
    note = views_note(config)
    if note:
        log.info("%s", note)
    mirror = _out_mirror(cfg.out)
    workdir = mirror.local if mirror else cfg.out  # OUT, or its local copy (OUT on an object store)
    latest = latest_checkpoint(workdir)
    if latest is not None:  # (whichever worker count wrote it: a run goes on with any)
        saved, cursor = read_checkpoint(latest)
        check_resume(saved, cursor, config, latest)
        changes = objective_changes(saved, config)
        if changes:
            log.warning("the objective differs from the one %s trained with: %s; the rest of the run trains with "
                        "this one (rerun with the old values, or `distill train --resume OUT`, to keep it)", latest,
                        ", ".join(changes))
    make_dir(workdir)
    if cfg.verify_shards:
        check_shards(cfg.shards, workdir, cfg.progress)
    make_dir(os.path.join(workdir, CHECKPOINTS))  # (before any step: it marks OUT as a training run's, killed or not)
    import_tensorflow_quietly()  # (options, paths and shards are checked: now the slow part)
    if stop.requested:
        raise Stopped("stopped before the first step (nothing trained, nothing to save); rerun the same command to "
                      "start", stop.signum)
    store = LocalCheckpoints(workdir, cfg.keep_checkpoints, mirror)
    if cfg.workers > 1:
        from distill.workers.train_worker import run_ray

        summary = run_ray(config, stop, adopt_into=store)
    else:
        from distill.train.loop import train_loop

        summary = train_loop(config, _local_strategy(cfg), rank=0, world_size=1, store=store, stop=stop)
    checkpoint = latest_checkpoint(workdir) or ""
    if mirror and checkpoint:  # (where it is in the store)
        checkpoint = f"{cfg.out}/{os.path.relpath(checkpoint, workdir)}"
    return TrainReport(out=cfg.out, checkpoint=checkpoint, **summary)


def _out_mirror(out: str):
    """OUT on an object store: its local copy, pulled (the store's finished checkpoints, ``best/``
    and logs), which the run works in and pushes back; None for a local OUT."""
    if not is_uri(out):
        return None
    from distill.mirror import run_mirror

    return run_mirror(out)


# ---------------------------------------------------------------- CLI


def saved_options(student_dir: str) -> dict:
    """The options of the run in ``student_dir``, as its newest checkpoint saved them."""
    from dataclasses import asdict

    from distill.train.config import TrainRun

    mirror = _out_mirror(student_dir)
    latest = latest_checkpoint(mirror.local if mirror else student_dir)
    if latest is None:
        if not is_uri(student_dir) and os.path.isfile(os.path.join(student_dir, "manifest.json")):
            raise BadOption(f"--resume {student_dir}: that is a shard directory (made by `distill embed`); --resume "
                            f"takes a student directory. Start a run with `distill train {student_dir} --out "
                            f"{os.path.join(os.path.dirname(os.path.abspath(student_dir)), 'student')}`")
        raise FileNotFoundError(f"--resume {student_dir}: no checkpoint there to resume; start the run with "
                                f"`distill train SHARDS --out {student_dir}`")
    return asdict(TrainRun.from_json(read_checkpoint(latest)[0]).train)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train the student on the shards",
        description="Stream the shards into a student (MobileNetV2 or MobileFaceNet). The loss is "
                    "distill_weight x distillation (nmse: 2 - 2 cos to the teacher's embedding) + contrast_weight x "
                    "contrastive distillation (each embedding picks its own teacher target out of the batch's) + pair_weight x "
                    "relational distillation on the hardest impostors + "
                    "ce_weight x the identity classifier on the labelled rows. Rerun the same command (or "
                    "`distill train --resume OUT`) to resume after an interruption.",
    )
    add_options(p, TrainConfig, config_file=True)
    p.add_argument("--resume", metavar="OUT", default=None,
                   help="go on with the run in OUT (its student directory) with the options it was started with; "
                        "flags given as well win where they may (e.g. --workers, --max-steps)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from distill.options import dump_toml

    if args.resume and args.config:
        raise BadOption("pass --resume OUT (the run's own options) or --config FILE, not both")
    base = saved_options(args.resume) if args.resume else None
    cfg = config_from_args(TrainConfig, args, base=base, base_name=f"the run in {args.resume}")
    if args.print_config:
        print(dump_toml(cfg), end="")
        return 0
    r = run_train(cfg)
    parts = "  ".join(f"{k} {v:.4f}" for k, v in r.final.items())
    print(f"trained to step {r.steps} ({r.epochs_done} epochs done) in {r.seconds:.1f}s, "
          f"{r.images_per_sec:.1f} images/s; {parts}")
    print(f"checkpoint: {r.checkpoint}")
    print(f"next: distill export {r.out} --out {os.path.join(os.path.dirname(r.out), 'export')}")
    return 0
