"""Train the student on the shards: ``distill train RUN/shards --out RUN/student``.

Owns the training loop and its logs. One loop (``train_loop``: a custom
``tf.GradientTape`` + ``strategy.run`` step, because Keras 3 ``model.fit`` fails under
MultiWorkerMirroredStrategy) runs in all three modes: the default strategy on CPU,
MirroredStrategy over the GPUs of one node, and one process per Ray Train worker under
MultiWorkerMirroredStrategy (``--workers N``, see ``workers/train_worker.py``).

A checkpoint (``distill/checkpoints.py``: weights, optimizer state and the data cursor) is
saved every ``--checkpoint-every`` steps and at each epoch end. Rerunning the same command
resumes at the exact sample; a rerun that would change the order or the architecture is
refused and told why.

Hands on: ``RUN/student/checkpoints/ckpt-*`` (read by ``export``), ``metrics.jsonl`` (one
object per logged step and per epoch), TensorBoard logs in ``tb/``, and with
``--trace-samples`` ``trace.jsonl`` (the listing indices of every step; a debugging aid).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from distill.checkpoints import Cursor, LocalCheckpoints, latest_checkpoint, read_checkpoint, restore, snapshot
from distill.losses import DISTILL_LOSSES, LossSpec
from distill.student import HEADS, MARGINS, StudentSpec

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    shards: str
    out: str
    epochs: int = 1
    batch_size: int = 64  # global: the sum over all workers and replicas
    lr: float = 1e-3  # for the global batch, whatever the worker count
    optimizer: str = "adam"
    lr_schedule: str = "cosine"
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    ce_weight: float = 1.0
    mse_weight: float = 1.0
    distill_loss: str = "mse"
    seed: int = 0
    workers: int = 1
    use_gpu: bool = False
    address: str | None = None
    width: float = 0.5
    head: str = "gdc"
    margin: str = "softmax"
    embedding_dim: int | None = None  # None: the teacher's
    shuffle_buffer: int = 4096
    flip: bool = True
    mixed_precision: bool = False
    max_steps: int | None = None
    log_every: int = 10
    trace_samples: bool = False
    run_name: str = "train"
    progress: bool = True

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "checkpoint_every", "keep_checkpoints", "workers", "log_every", "shuffle_buffer")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"--max-steps must be positive, got {self.max_steps}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if self.batch_size % self.workers:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --workers {self.workers}")
        if self.mixed_precision and not self.use_gpu:
            raise ValueError(
                "--mixed-precision needs --use-gpu: float16 on a CPU is slower than float32, not faster. "
                "Drop --mixed-precision, or train on GPUs"
            )
        LossSpec(self.ce_weight, self.mse_weight, self.distill_loss, self.margin)  # validates early


@dataclass(frozen=True)
class TrainReport:
    out: str
    checkpoint: str
    steps: int
    epochs_done: int
    samples_trained: int  # by this invocation
    seconds: float
    images_per_sec: float
    final: dict[str, float]
    resumed_from_step: int | None


# ---------------------------------------------------------------- pure decisions


def resolve(cfg: TrainConfig, shards) -> dict[str, Any]:
    """The config as trained: the architecture, the objective, and what the shards fix. Pure."""
    from distill.stream import resolve_flip

    student = StudentSpec(
        input_size=shards.input_size,
        embedding_dim=cfg.embedding_dim or shards.embedding_dim,
        num_classes=shards.num_classes,
        width=cfg.width, head=cfg.head, margin=cfg.margin,
    )
    if student.embedding_dim != shards.embedding_dim and cfg.distill_loss == "mse" and cfg.mse_weight > 0:
        raise ValueError(
            f"--embedding-dim {student.embedding_dim} differs from the teacher's {shards.embedding_dim}; the "
            "MSE to the teacher needs equal dims. Drop --embedding-dim"
        )
    return {
        "train": asdict(cfg),
        "student": asdict(student),
        "loss": asdict(LossSpec(cfg.ce_weight, cfg.mse_weight, cfg.distill_loss, cfg.margin)),
        "flip": resolve_flip(shards, cfg.flip),
        "shards_run_id": shards.run_id,
    }


# Changing these mid-run would silently change the data order or the graph.
_FIXED_TRAIN = ("batch_size", "seed", "shuffle_buffer", "optimizer")


def check_resume(saved: dict[str, Any], cursor: Cursor, wanted: dict[str, Any], world_size: int, where: str) -> None:
    """Refuse a resume that cannot continue the saved run exactly, naming every difference. Pure."""
    wanted = json.loads(json.dumps(wanted))  # compare as saved: tuples become lists
    diffs = []
    if saved["shards_run_id"] != wanted["shards_run_id"]:
        diffs.append(f"  shards: checkpoint trained on run {saved['shards_run_id']}, now {wanted['shards_run_id']}")
    for k in _FIXED_TRAIN:
        if saved["train"][k] != wanted["train"][k]:
            diffs.append(f"  --{k.replace('_', '-')}: checkpoint has {saved['train'][k]!r}, now {wanted['train'][k]!r}")
    if saved["flip"] != wanted["flip"]:
        diffs.append(f"  flip: checkpoint has {saved['flip']}, now {wanted['flip']}")
    for k, v in saved["student"].items():
        if v != wanted["student"].get(k):
            diffs.append(f"  student {k}: checkpoint has {v!r}, now {wanted['student'][k]!r}")
    if cursor.world_size != world_size and cursor.samples:
        # The epoch's order depends on the world size; at an epoch boundary nothing is lost.
        diffs.append(
            f"  workers: checkpoint is mid-epoch ({cursor.samples} samples into epoch {cursor.epoch}) with "
            f"{cursor.world_size} workers, now {world_size}"
        )
    if diffs:
        raise ValueError(
            f"{where} holds a run this command cannot continue exactly:\n" + "\n".join(diffs)
            + "\nRerun with the original options, or train into a new --out directory."
        )


def schedule_steps(cfg: TrainConfig, total_rows: int) -> int:
    """Steps the learning-rate schedule spans: the planned run (dropped remainders included)."""
    planned = max(1, cfg.epochs * (total_rows // cfg.batch_size))
    return min(planned, cfg.max_steps) if cfg.max_steps else planned


def should_checkpoint(step: int, every: int) -> bool:
    return step % every == 0


# ---------------------------------------------------------------- logs (rank 0)


class RunLog:
    """metrics.jsonl, trace.jsonl and TensorBoard. On resume, records past the checkpoint
    (written by the run that died) are dropped, so each step appears once."""

    def __init__(self, out: str, resume_step: int, enabled: bool, trace: bool):
        self.enabled = enabled
        self.metrics = self.trace = self.tb = None
        if not enabled:
            return
        os.makedirs(out, exist_ok=True)
        paths = [os.path.join(out, "metrics.jsonl")] + ([os.path.join(out, "trace.jsonl")] if trace else [])
        for p in paths:
            _trim_jsonl(p, resume_step)
        self.metrics = open(paths[0], "a")
        self.trace = open(paths[1], "a") if trace else None
        import tensorflow as tf

        self.tb = tf.summary.create_file_writer(os.path.join(out, "tb"))

    def record(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        # tf.summary.scalar needs the tensorboard package; the raw write with the scalars
        # plugin's metadata is what it writes, and TensorBoard reads it the same.
        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        with self.tb.as_default(step=rec["step"]):
            prefix = "epoch" if rec["kind"] == "epoch" else "train"
            for k in ("loss", "ce", "mse", "images_per_sec", "lr"):
                if k in rec:
                    tf.summary.write(f"{prefix}/{k}", tf.constant(rec[k], tf.float32), metadata=meta)
        self.tb.flush()

    def trace_step(self, step: int, epoch: int, index: np.ndarray) -> None:
        if self.enabled and self.trace is not None:
            self.trace.write(json.dumps({"step": step, "epoch": epoch, "index": index.tolist()}) + "\n")
            self.trace.flush()

    def close(self) -> None:
        for f in (self.metrics, self.trace):
            if f is not None:
                f.close()
        if self.tb is not None:
            self.tb.close()


def _trim_jsonl(path: str, max_step: int) -> None:
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the half-written last line of a killed run
            if rec.get("step", 0) <= max_step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the loop


def _optimizer(cfg: TrainConfig, total_steps: int):
    import keras

    lr = cfg.lr
    if cfg.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=total_steps, alpha=0.01)
    opt = keras.optimizers.Adam(lr) if cfg.optimizer == "adam" else keras.optimizers.SGD(lr, momentum=0.9, nesterov=True)
    return keras.optimizers.LossScaleOptimizer(opt) if cfg.mixed_precision else opt


def _make_step(model, optimizer, strategy, loss_spec: LossSpec, global_batch: int, trace: bool):
    import tensorflow as tf

    from distill.losses import loss_parts

    def replica(b):
        with tf.GradientTape() as tape:
            out = model(b["image"], training=True)
            parts = loss_parts(out["embedding"], out["logits"], b["target"], b["label"], loss_spec, global_batch)
            scaled = optimizer.scale_loss(parts["loss"])  # identity unless mixed precision
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return parts, b["index"]

    @tf.function
    def step(batch):
        parts, index = strategy.run(replica, args=(batch,))
        parts = {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in parts.items()}
        index = strategy.gather(index, axis=0) if trace else tf.zeros([0], tf.int64)
        return parts, index

    return step


def train_loop(cfg: TrainConfig, strategy, *, rank: int, world_size: int, store) -> dict[str, Any]:
    """The loop every mode runs: restore, then epochs of steps from the cursor on.

    ``world_size``/``rank`` count input pipelines (one per worker process); the global batch
    splits evenly over all replicas. ``store`` saves and finds checkpoints (local or Ray).
    """
    from tqdm import tqdm

    from distill.stream import make_dataset, open_shards, plan_epoch
    from distill.student import build_student

    shards = open_shards(cfg.shards)
    config = resolve(cfg, shards)
    replicas = strategy.num_replicas_in_sync
    if cfg.batch_size % replicas:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the {replicas} replicas in sync")
    latest = store.latest()
    cursor = Cursor(0, 0, 0, cfg.seed, world_size, cfg.batch_size, cfg.shuffle_buffer, shards.run_id)
    if latest is not None:
        saved, cursor = read_checkpoint(latest)
        check_resume(saved, cursor, config, world_size, store.describe(latest))
        cursor = replace(cursor, world_size=world_size)
    resumed_from = cursor.step if latest is not None else None
    if cfg.mixed_precision:
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")
    student = StudentSpec.from_json(config["student"])
    loss_spec = LossSpec(**config["loss"])
    with strategy.scope():
        model = build_student(student)
        optimizer = _optimizer(cfg, schedule_steps(cfg, shards.total_rows))
        optimizer.build(model.trainable_variables)
    if latest is not None:
        restore(model, optimizer, latest)
        log.info("resumed from %s: epoch %d, sample %d, step %d", store.describe(latest), cursor.epoch, cursor.samples, cursor.step)
    step_fn = _make_step(model, optimizer, strategy, loss_spec, cfg.batch_size, cfg.trace_samples)
    runlog = RunLog(cfg.out, cursor.step, enabled=rank == 0, trace=cfg.trace_samples)
    last_saved = cursor.step if latest is not None else -1
    last: dict[str, float] = {}
    trained, t_start = 0, time.perf_counter()

    def summary() -> dict[str, Any]:
        seconds = time.perf_counter() - t_start
        return {"steps": cursor.step, "epochs_done": cursor.epoch, "samples_trained": trained, "seconds": seconds,
                "images_per_sec": trained / max(seconds, 1e-9), "final": last, "resumed_from_step": resumed_from}

    def save() -> None:
        nonlocal last_saved
        state = snapshot(model, optimizer)  # on every rank: reading on-read-synced variables is a collective
        last_saved = cursor.step
        # The summary rides along: under Ray Train it is what the driver gets back.
        store.save(state, config, cursor, summary())

    def done() -> bool:
        return cursor.epoch >= cfg.epochs or (cfg.max_steps is not None and cursor.step >= cfg.max_steps)

    rank_batch = cfg.batch_size // world_size
    try:
        while not done():
            plan = plan_epoch(
                shards.rows, seed=cfg.seed, epoch=cursor.epoch, world_size=world_size, rank=rank,
                buffer=cfg.shuffle_buffer, global_batch=cfg.batch_size, samples=cursor.samples,
            )
            if plan.steps == 0:
                raise ValueError(
                    f"an epoch has no whole batch of {rank_batch} per worker (rows per worker: {shards.total_rows} "
                    f"over {world_size}); lower --batch-size or --workers"
                )

            def dataset_fn(ctx, plan=plan):
                if ctx.num_input_pipelines != world_size or ctx.input_pipeline_id != rank:
                    raise ValueError(f"input pipeline {ctx.input_pipeline_id}/{ctx.num_input_pipelines} is not rank {rank}/{world_size}")
                return make_dataset(shards, plan, seed=cfg.seed, flip=config["flip"],
                                    replica_batch=ctx.get_per_replica_batch_size(cfg.batch_size))

            batches = iter(strategy.distribute_datasets_from_function(dataset_fn))
            bar = tqdm(total=plan.steps, initial=plan.start_step, desc=f"epoch {cursor.epoch + 1}/{cfg.epochs}",
                       unit="step", disable=rank != 0 or not cfg.progress, dynamic_ncols=True)
            sums = {"loss": 0.0, "ce": 0.0, "mse": 0.0}
            n_steps, t_epoch, t_log, since_log = 0, time.perf_counter(), time.perf_counter(), 0
            for _ in range(plan.start_step, plan.steps):
                if done():
                    break
                parts, index = step_fn(next(batches))
                parts = {k: float(v) for k, v in parts.items()}
                cursor = replace(cursor, samples=cursor.samples + cfg.batch_size, step=cursor.step + 1)
                trained += cfg.batch_size
                n_steps += 1
                since_log += 1
                for k in sums:
                    sums[k] += parts[k]
                last = parts
                now = time.perf_counter()
                ips = since_log * cfg.batch_size / max(now - t_log, 1e-9)
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in parts.items()} | {"img/s": f"{ips:.0f}"}, refresh=False)
                if cfg.trace_samples:
                    runlog.trace_step(cursor.step, cursor.epoch, index.numpy())
                if cursor.step % cfg.log_every == 0:
                    runlog.record({"kind": "step", "epoch": cursor.epoch, "step": cursor.step, "samples": cursor.samples,
                                   **parts, "lr": _lr(optimizer), "images_per_sec": ips})
                    t_log, since_log = now, 0
                if should_checkpoint(cursor.step, cfg.checkpoint_every) and cursor.samples < plan.steps * cfg.batch_size:
                    # (at the epoch's last step the epoch-end checkpoint below covers it)
                    save()
            bar.close()
            if cursor.samples == plan.steps * cfg.batch_size:
                seconds = time.perf_counter() - t_epoch
                epoch_rec = {"kind": "epoch", "epoch": cursor.epoch, "step": cursor.step, "samples": cursor.samples,
                             **{k: v / max(n_steps, 1) for k, v in sums.items()}, "steps_averaged": n_steps,
                             "images_per_sec": n_steps * cfg.batch_size / max(seconds, 1e-9), "seconds": seconds}
                runlog.record(epoch_rec)
                cursor = replace(cursor, epoch=cursor.epoch + 1, samples=0)
                save()
        if last_saved != cursor.step or trained == 0:
            save()  # the end state, and (on a rerun with nothing left to do) this run's summary
    finally:
        runlog.close()
    return summary()


def _lr(optimizer) -> float:
    return float(optimizer.learning_rate.numpy() if hasattr(optimizer.learning_rate, "numpy") else optimizer.learning_rate)


# ---------------------------------------------------------------- modes


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
