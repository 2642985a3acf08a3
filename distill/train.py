"""Train the student on the shards: ``distill train RUN/shards --out RUN/student``.

Owns the command and the choice of mode: the default strategy on CPU, MirroredStrategy over
the GPUs of one node, or ``--workers N`` Ray Train workers (``workers/train_worker.py``).
Every mode runs the same loop (``distill/loop.py``) on the same resolved config
(``distill/train_config.py``).

A checkpoint (``distill/checkpoints.py``: weights, optimizer state and the data cursor) is
saved every ``--checkpoint-every`` steps and at each epoch end. Rerunning the same command
resumes at the exact sample; a rerun that would change the order or the architecture is
refused and told why.

Hands on: ``RUN/student/checkpoints/ckpt-*`` (read by ``export``), ``metrics.jsonl`` (one
object per logged step and per epoch), TensorBoard logs in ``tb/``, and with
``--trace-samples`` ``trace.jsonl`` (the listing indices of every step; a debugging aid).
"""

from __future__ import annotations

import os
from dataclasses import replace

from distill.checkpoints import LocalCheckpoints, latest_checkpoint, read_checkpoint
from distill.losses import DISTILL_LOSSES
from distill.student import HEADS, MARGINS
from distill.train_config import OPTIMIZERS, SCHEDULES, TrainConfig, TrainReport, check_resume, resolve

__all__ = ["TrainConfig", "TrainReport", "run_train", "add_cli"]


def _local_strategy(cfg: TrainConfig):
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if cfg.use_gpu and not gpus:
        raise ValueError("--use-gpu given but TensorFlow sees no GPU here; drop --use-gpu to train on the CPU")
    if not cfg.use_gpu and gpus:
        tf.config.set_visible_devices([], "GPU")  # asked for CPU: keep TF off the GPUs
        gpus = []
    for g in gpus:
        tf.config.experimental.set_memory_growth(g, True)
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def run_train(cfg: TrainConfig) -> TrainReport:
    """Train (or resume) to ``cfg.epochs`` / ``cfg.max_steps``; the public entry point."""
    from distill.stream import open_shards

    cfg = replace(cfg, out=os.path.abspath(cfg.out), shards=cfg.shards if "://" in cfg.shards else os.path.abspath(cfg.shards))
    # Refuse bad shards, options or an incompatible resume before TensorFlow or Ray start.
    config = resolve(cfg, open_shards(cfg.shards))
    latest = latest_checkpoint(cfg.out)
    if latest is not None and cfg.workers == 1:  # (Ray runs keep theirs under OUT/ray; checked in the workers)
        saved, cursor = read_checkpoint(latest)
        check_resume(saved, cursor, config, 1, latest)
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.workers > 1:
        from workers.train_worker import run_ray

        summary = run_ray(cfg)
    else:
        from distill.loop import train_loop

        summary = train_loop(cfg, _local_strategy(cfg), rank=0, world_size=1, store=LocalCheckpoints(cfg.out, cfg.keep_checkpoints))
    return TrainReport(out=cfg.out, checkpoint=latest_checkpoint(cfg.out) or "", **summary)


# ---------------------------------------------------------------- CLI


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train the MobileNet student on the shards",
        description="Stream the shards into a MobileNetV2 student: loss = ce_weight*CE + mse_weight*MSE(student, teacher). "
                    "Rerun the same command to resume after an interruption.",
    )
    p.add_argument("shards", help="shard directory written by `distill embed` (RUN/shards)")
    p.add_argument("--out", required=True, help="student directory (RUN/student): checkpoints, metrics.jsonl, tb/")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64, help="global batch, over all workers (default 64); each epoch drops the rows that do not fill one")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate for the global batch (default 1e-3)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default="cosine")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (also at each epoch end)")
    p.add_argument("--keep-checkpoints", type=int, default=3)
    p.add_argument("--ce-weight", type=float, default=1.0)
    p.add_argument("--mse-weight", type=float, default=1.0)
    p.add_argument("--distill-loss", choices=DISTILL_LOSSES, default="mse", help="mse, or cosine (1 - cos)")
    p.add_argument("--seed", type=int, default=0, help="fixes the data order, flips and initial weights")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1: train in this process)")
    p.add_argument("--use-gpu", action="store_true", help="train on GPUs (all local ones, or one per Ray worker)")
    p.add_argument("--address", help="Ray cluster address for --workers > 1 (default: start a local one)")
    p.add_argument("--width", type=float, default=0.5, help="MobileNetV2 width multiplier (alpha)")
    p.add_argument("--head", choices=HEADS, default="gdc", help="embedding head: global depthwise conv, or GAP+BN+Dropout+Dense")
    p.add_argument("--margin", choices=MARGINS, default="softmax", help="classifier: plain softmax or ArcFace (s=64, m=0.5)")
    p.add_argument("--embedding-dim", type=int, help="student embedding dim (default: the teacher's)")
    p.add_argument("--shuffle-buffer", type=int, default=4096, help="rows in the shuffle buffer (bounds memory)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flip")
    p.add_argument("--mixed-precision", action="store_true", help="float16 compute with loss scaling (GPUs only)")
    p.add_argument("--max-steps", type=int, help="stop after this many global steps (smoke runs, tests)")
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl records")
    p.add_argument("--trace-samples", action="store_true",
                   help="debugging aid: append each step's listing indices to OUT/trace.jsonl")
    p.add_argument("--run-name", default="train", help="Ray Train run name (a rerun with the same name resumes)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=_main)


def _main(args) -> int:
    cfg = TrainConfig(**{f: getattr(args, f) for f in TrainConfig.__dataclass_fields__})
    r = run_train(cfg)
    parts = "  ".join(f"{k} {v:.4f}" for k, v in r.final.items())
    print(f"trained to step {r.steps} ({r.epochs_done} epochs done) in {r.seconds:.1f}s, "
          f"{r.images_per_sec:.1f} images/s; {parts}")
    print(f"checkpoint: {r.checkpoint}")
    print(f"next: distill export {r.out} --out {os.path.join(os.path.dirname(r.out), 'export')}")
    return 0
