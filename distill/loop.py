"""The training loop every mode runs: ``train_loop(cfg, strategy, rank, world_size, store)``.

A custom ``tf.GradientTape`` + ``strategy.run`` step (Keras 3 ``model.fit`` fails under
MultiWorkerMirroredStrategy) that runs unchanged on the default strategy (CPU),
MirroredStrategy over one node's GPUs, and one process per Ray Train worker. It restores
from ``store`` (local checkpoints or Ray Train's), plans each epoch from the cursor
(``distill.stream``), steps, logs (``RunLog``: metrics.jsonl, TensorBoard, the sample
trace) and checkpoints. It returns the run's summary; where checkpoints go is the store's
business.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from typing import Any

import numpy as np

from distill.checkpoints import Cursor, read_checkpoint, restore, snapshot
from distill.losses import LossSpec
from distill.student import StudentSpec
from distill.train_config import TrainConfig, check_resume, resolve, schedule_steps, should_checkpoint

log = logging.getLogger(__name__)


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
