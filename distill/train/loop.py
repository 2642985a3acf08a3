"""The training loop every mode runs: ``train_loop(run, strategy, rank, world_size, store)``,
``run`` being the ``TrainRun`` the driver resolved and checked once (no rank resolves it again).

A custom ``tf.GradientTape`` + ``strategy.run`` step (Keras 3 ``model.fit`` fails under
MultiWorkerMirroredStrategy) that runs unchanged on the default strategy (CPU),
MirroredStrategy over one node's GPUs, and one process per Ray Train worker. It restores
from ``store`` (local checkpoints or Ray Train's), plans each epoch from the cursor
(``distill.train.stream``), steps, logs (``RunLog``: metrics.jsonl, TensorBoard, the sample
trace) and checkpoints. It returns the run's summary; where checkpoints go is the store's
business.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from distill.errors import BadInput, BadOption, Diverged, IncompatibleRun, Stopped
from distill.heartbeat import Heartbeat, interval, train_line
from distill.startup import show_progress
from distill.stopping import StopRequest, read_request
from distill.storage import is_uri, write_file_atomic
from distill.train.checkpoints import (
    Cursor,
    averaged,
    load_student,
    not_finite,
    read_best_val,
    read_checkpoint,
    restore,
    snapshot,
    write_best,
)
from distill.train.config import Schedule, TrainConfig, TrainRun, check_resume, ema_warning, should_checkpoint
from distill.train.losses import LossSpec, unused_options
from distill.train.order import steps_per_epoch
from distill.train.student import StudentSpec
from distill.train.validate import is_better

REQUEST_POLL_S = 2.0  # how often Ray Train workers look for the driver's stop request on an object store

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
            prefix = "train" if rec["kind"] == "step" else "epoch"
            for k in ("loss", "distill", "contrast", "pair", "ce", "cos", "images_per_sec", "lr"):
                if k in rec:
                    tf.summary.write(f"{prefix}/{k}", tf.constant(rec[k], tf.float32), metadata=meta)
            for k, v in rec.items():  # held-out auc, cos, accuracy; each --val-bin set's acc and auc
                if k.startswith("val_") and k != "val_seconds" and isinstance(v, float):
                    tf.summary.write(f"val/{k[4:]}", tf.constant(v, tf.float32), metadata=meta)
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
    write_file_atomic(path, "".join(keep))


# ---------------------------------------------------------------- before the first step


@dataclass(frozen=True)
class Prepared:
    """What one pass over the shards decides before training: which rows train, the teacher's
    class centres, which classes the softmax leaves out, and (rank 0) the validator."""

    train_rows: int
    exclude: np.ndarray | None = None  # bool per sample id: held-out rows
    heldout: np.ndarray | None = None  # held-out class ids
    centres: np.ndarray | None = None  # [C, D] teacher class centres (teacher margin)
    class_bias: np.ndarray | None = None  # [C] 0, or -1e4 for classes out of the softmax
    validator: Any = None


def prepare(cfg: TrainConfig, shards, rank: int, student: StudentSpec, workdir: str) -> Prepared:
    from distill.train.centres import scan_shards
    from distill.train.validate import Validator, from_bin, from_folders, from_shards, heldout_classes, pick_samples

    teacher_head = student.margin == "teacher"
    prep, val = Prepared(train_rows=shards.total_rows), None
    if cfg.val_split or teacher_head:
        scan = scan_shards(shards, centres=teacher_head, cache_dir=workdir)
        heldout = heldout_classes(scan.counts, cfg.val_split, cfg.val_seed)
        exclude = np.isin(scan.labels, heldout) if len(heldout) else None
        out_of_softmax = np.isin(np.arange(shards.num_classes), heldout) | (scan.counts == 0)
        prep = Prepared(
            train_rows=int(shards.total_rows - (exclude.sum() if exclude is not None else 0)),
            exclude=exclude, heldout=heldout,
            centres=scan.centres(heldout) if teacher_head else None,
            class_bias=np.where(out_of_softmax, -1e4, 0.0).astype(np.float32) if out_of_softmax.any() else None,
        )
        if exclude is not None:
            log.info("validation: holding out %d of %d identities (%d rows)", len(heldout),
                     int((scan.counts > 0).sum()), int(exclude.sum()))
            if rank == 0:
                val = from_shards(shards, pick_samples(scan.labels, heldout, cfg.val_images, cfg.val_seed), cfg.val_seed)
    if rank == 0 and cfg.val_folders:
        val = from_folders(cfg.val_folders, shards, cfg.val_images, cfg.val_seed)
    bins = tuple(from_bin(name, path, shards.input_size) for name, path in cfg.val_bins) if rank == 0 else ()
    if val is None and not bins:
        return prep
    validator = Validator(val, student, bins)
    log.info("validating at every epoch end%s on %s; OUT/best by %s",
             f" and every {cfg.val_every} steps" if cfg.val_every else "", validator.source, cfg.best_key)
    return replace(prep, validator=validator)


# ---------------------------------------------------------------- what the step needs


def _optimizer(cfg: TrainConfig, schedule: Schedule):
    """The optimizer over the recorded ``schedule`` (``distill.train.config.lr_schedule``)."""
    import keras

    peak, warmup = schedule.lr, schedule.warmup_steps
    # Cosine (or, with alpha=1, constant) after a linear warm-up from 1% of the peak.
    lr = keras.optimizers.schedules.CosineDecay(
        peak * (0.01 if warmup else 1.0), decay_steps=schedule.decay_steps or 1,
        alpha=0.01 if schedule.kind == "cosine" else 1.0,
        warmup_target=peak if warmup else None, warmup_steps=warmup,
    )
    wd = cfg.weight_decay or None
    ema = {"use_ema": True, "ema_momentum": cfg.ema} if cfg.ema else {}  # averages kept as optimizer variables
    if cfg.optimizer == "adam":
        opt = keras.optimizers.Adam(lr, weight_decay=wd, **ema)
    else:
        opt = keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, weight_decay=wd, **ema)
    if wd:
        # Decay shrinks weights towards 0; scales, shifts, biases and class centres are not weights of that kind.
        opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias", "centres"])
    return keras.optimizers.LossScaleOptimizer(opt) if cfg.mixed_precision else opt


def _make_step(model, optimizer, strategy, loss_spec: LossSpec, global_batch: int, trace: bool,
               class_bias: np.ndarray | None = None, adaptive_centres=None):
    """The compiled step: forward, named loss parts, gradients for the student, and (with
    ``adaptive_centres``, the teacher head's centre variable) AdaDistill's centre update on the
    whole global batch, identical on every replica."""
    import tensorflow as tf

    from distill.train.centres import adaptive_update_tf
    from distill.train.losses import loss_parts

    bias = tf.constant(class_bias, tf.float32) if class_bias is not None else None
    gather = trace or adaptive_centres is not None

    def replica(b):
        with tf.GradientTape() as tape:
            out = model(b["image"], training=True)
            parts = loss_parts(out["embedding"], out.get("logits"), b["target"], b["label"], loss_spec, global_batch, bias)
            scaled = optimizer.scale_loss(parts["loss"])  # identity unless mixed precision
        grads = tape.gradient(scaled, model.trainable_variables)
        # Variables no term of the loss reaches (the classifier when --ce-weight is 0) get no update.
        optimizer.apply_gradients([(g, v) for g, v in zip(grads, model.trainable_variables) if g is not None])
        seen = (b["index"], tf.cast(out["embedding"], tf.float32), b["target"], b["label"])
        return parts, seen

    @tf.function
    def step(batch, stop):
        parts, seen = strategy.run(replica, args=(batch,))
        parts = {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in parts.items()}
        # Whether any worker was asked to stop: every worker learns it at this same step.
        parts["stop"] = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda s: s, args=(stop,)), axis=None)
        if not gather:
            return parts, tf.zeros([0], tf.int64)
        index, emb, target, label = (strategy.gather(v, axis=0) for v in seen)
        if adaptive_centres is not None:
            adaptive_centres.assign(adaptive_update_tf(adaptive_centres, emb, target, label))
        return parts, index if trace else tf.zeros([0], tf.int64)

    return step


def _load_init(model, spec: StudentSpec, cfg: TrainConfig) -> str:
    """Fresh start from earlier weights (``--init``, ``--backbone-weights``); says what it loaded."""
    import keras

    from distill.train.checkpoints import find_checkpoint
    from distill.train.student import build_student

    h, w = spec.working_size
    if cfg.backbone_weights == "imagenet" or (cfg.init and cfg.init.endswith((".h5", ".hdf5", ".keras"))):
        source = "imagenet" if cfg.backbone_weights else cfg.init
        try:
            with warnings.catch_warnings():
                # Keras 3 notes the functional graph's bookkeeping containers it skips; the layers load.
                warnings.filterwarnings("ignore", message="Skipping nested container")
                src = keras.applications.MobileNetV2(input_shape=(h, w, 3), alpha=spec.width, include_top=False,
                                                     weights=source)
        except Exception as e:  # a failed download, a file of another width: Keras raises many types
            if source == "imagenet":
                raise BadOption(
                    f"--backbone-weights imagenet: Keras could not fetch the MobileNetV2 (alpha {spec.width}) ImageNet "
                    f"weights ({type(e).__name__}: {str(e).splitlines()[0][:200]}). Without network access, download "
                    f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{spec.width:g}_224_no_top.h5 from "
                    "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/ elsewhere and pass "
                    "--init FILE instead (Keras accepts only alpha 0.35, 0.5, 0.75, 1.0, 1.3, 1.4)"
                ) from e
            raise BadInput(f"--init {source}: not MobileNetV2 (alpha {spec.width}) backbone weights: {e}") from e
        by_name = {layer.name: layer for layer in model.layers}
        copied = 0
        for layer in src.layers:
            if layer.weights and layer.name in by_name:
                by_name[layer.name].set_weights(layer.get_weights())
                copied += 1
        if copied == 0:
            raise BadInput(f"--init {source}: no layer of it matches the student's MobileNetV2 backbone")
        return f"backbone from {source} ({copied} layers)"
    path = find_checkpoint(cfg.init)
    src = build_student(StudentSpec.from_json(read_checkpoint(path)[0]["student"]))
    load_student(src, path)
    mine = {v.path: v for v in model.weights}
    copied, skipped = 0, []
    for v in src.weights:
        mv = mine.get(v.path)
        if mv is not None and tuple(mv.shape) == tuple(v.shape):
            mv.assign(v)
            copied += 1
        else:
            skipped.append(v.path)
    if copied == 0:
        raise BadInput(f"--init {cfg.init}: none of its variables match this student (width, head, dims differ)")
    return f"{copied} variables from {path}" + (f" ({len(skipped)} not matching, e.g. {skipped[0]})" if skipped else "")


# ---------------------------------------------------------------- the loop


class _Run:
    """One invocation of the loop on one rank: setup, epochs of steps from the cursor, saves."""

    def __init__(self, run: TrainRun, strategy, rank: int, world_size: int, store, stop: StopRequest | None = None):
        from distill.shards.reader import open_shards

        cfg = run.train
        self.cfg, self.strategy, self.rank, self.world_size, self.store = cfg, strategy, rank, world_size, store
        self.out = store.out  # where this rank's files go: OUT, or its local copy when OUT is on an object store
        self._request_checked = 0.0
        self.shards = open_shards(cfg.shards)  # (to read: what they fix is in the run already)
        if self.shards.run_id != run.shards_run_id:
            raise IncompatibleRun(f"{cfg.shards} changed under the run: it holds run {self.shards.run_id}, the run was "
                                  f"resolved on {run.shards_run_id}; rerun the command")
        self.resolved = run
        replicas = strategy.num_replicas_in_sync
        if cfg.batch_size % replicas:
            raise BadOption(f"--batch-size {cfg.batch_size} must be a multiple of the {replicas} replicas in sync")
        latest = store.latest()
        self.cursor = Cursor(0, 0, 0, cfg.seed, world_size, cfg.batch_size, cfg.shuffle_buffer, self.shards.run_id)
        if latest is not None:  # (the driver checked OUT's newest; a Ray Train checkpoint it could not see is checked here)
            saved, cursor = read_checkpoint(latest)
            check_resume(saved, cursor, self.resolved, store.describe(latest))
            self.cursor = replace(cursor, world_size=world_size)
        self.resumed_from = self.cursor.step if latest is not None else None
        norm = self.shards.teacher_norm
        if norm and rank == 0:
            log.info("targets: raw teacher norm %.2f +- %.2f over %d rows; the %s term compares %s%s", norm["mean"],
                     norm["std"], norm["rows"], cfg.distill_loss, "raw values" if cfg.distill_loss == "mse" else "directions",
                     f", each row weighted by the norm to the power {cfg.distill_quality:g}" if cfg.distill_quality else "")
        for warning in (unused_options(self.resolved.loss) if rank == 0 else ()):
            log.warning("%s", warning)
        from distill.train.stream import check_decoder

        check_decoder(self.shards)  # (a few images: the student's pixels are the teacher's, or say why not)
        self.prep = prepare(cfg, self.shards, rank, self.resolved.student, self.out)
        self.resolved = self.resolved.with_schedule(self.prep.train_rows)
        self._build(latest)
        self.runlog = RunLog(self.out, self.cursor.step, enabled=rank == 0, trace=cfg.trace_samples)
        self.last_saved = self.cursor.step if latest is not None else -1
        self.last: dict[str, float] = {}
        self.trained, self.t_start = 0, time.perf_counter()
        self.best = read_best_val(self.out) if rank == 0 else None
        # --heartbeat: with the bars off, rank 0 logs where the run is every so many seconds.
        total = cfg.epochs * steps_per_epoch(self.prep.train_rows, cfg.batch_size)
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        if rank == 0 and ema_warning(cfg.ema, total):
            log.warning("%s", ema_warning(cfg.ema, total))
        self.pulse = Heartbeat(interval(cfg.heartbeat, show_progress(cfg.progress), rank), time.monotonic())
        self.stop = stop or StopRequest("training")

    def _build(self, latest: str | None) -> None:
        from distill.train.student import build_student

        cfg = self.cfg
        if cfg.mixed_precision:
            import keras

            keras.mixed_precision.set_global_policy("mixed_float16")
        self.spec = self.resolved.student
        with self.strategy.scope():
            self.model = build_student(self.spec)
            self.optimizer = _optimizer(cfg, self.resolved.schedule)
            self.optimizer.build(self.model.trainable_variables)
        centres = self.model.get_layer("logits").centres if self.spec.margin == "teacher" else None
        if latest is not None:
            restore(self.model, self.optimizer, latest)
            log.info("resumed from %s: epoch %d, sample %d, step %d", self.store.describe(latest),
                     self.cursor.epoch, self.cursor.samples, self.cursor.step)
        else:
            if cfg.init or cfg.backbone_weights:
                log.info("initialised: %s", _load_init(self.model, self.spec, cfg))
            if centres is not None:
                centres.assign(self.prep.centres.T)  # the teacher's class means
        self.step_fn = _make_step(
            self.model, self.optimizer, self.strategy, self.resolved.loss, cfg.batch_size,
            cfg.trace_samples, self.prep.class_bias, centres if cfg.centre_update == "adaptive" else None,
        )

    # -- bookkeeping
    def summary(self) -> dict[str, Any]:
        seconds = time.perf_counter() - self.t_start
        return {"steps": self.cursor.step, "epochs_done": self.cursor.epoch, "samples_trained": self.trained,
                "seconds": seconds, "images_per_sec": self.trained / max(seconds, 1e-9), "final": self.last,
                "resumed_from_step": self.resumed_from}

    def done(self) -> bool:
        c = self.cursor
        return c.epoch >= self.cfg.epochs or (self.cfg.max_steps is not None and c.step >= self.cfg.max_steps)

    def save(self, state: dict | None = None, val: dict[str, float] | None = None) -> None:
        if state is None:
            state = self._snapshot()
        self.last_saved = self.cursor.step
        # The summary rides along: under Ray Train it is what the driver gets back.
        self.store.save(state, self.resolved.to_json(), self.cursor, {**self.summary(), **(val or {})})

    def _snapshot(self, optimizer: bool = True) -> dict:
        """The weights (and the optimizer's state) as arrays, on every rank (reading on-read-synced
        variables is a collective). The update that broke the weights can come before any loss
        shows it (the last step of an epoch, a --checkpoint-every step): such weights are never
        saved or scored (the same on every rank: one state)."""
        state = snapshot(self.model, self.optimizer if optimizer else None)
        broken = not_finite(state)
        if broken:
            raise self._diverged(f"{len(broken)} of the weights at step {self.cursor.step} are not numbers "
                                 f"(e.g. {broken[0]})")
        return state

    def _diverged(self, what: str) -> Diverged:
        saved = self.last_saved
        if saved < 0:
            return Diverged(f"training diverged: {what}; nothing after the start was saved. Lower --lr, or undo what "
                            "made the loss blow up, and rerun (the same --out starts afresh)")
        return Diverged(f"training diverged: {what}; nothing after the checkpoint at step {saved} was saved. Lower "
                        "--lr in a new --out (--init OUT starts it from that checkpoint), or undo what made the loss "
                        "blow up, and rerun")

    def validate(self, state: dict, keep_best: bool = True) -> dict[str, float] | None:
        """Score a snapshot on the held-out people (rank 0, a model of its own: no collectives)
        and keep the best epoch's checkpoint in OUT/best."""
        if self.prep.validator is None:
            return None
        t0 = time.perf_counter()
        judged = averaged(state, [v.path for v in self.model.trainable_variables])  # (--ema: the averages)
        val = self.prep.validator(judged)
        val["val_seconds"] = round(time.perf_counter() - t0, 3)
        if keep_best and is_better(val, self.best, self.cfg.best_key):
            write_best(self.out, judged, self.resolved.to_json(), self.cursor, {**val, "epochs_done": self.cursor.epoch,
                                                                     "step": self.cursor.step})
            self.store.sync()
            self.best = val
            val["best"] = True
        return val

    def _validate_mid_epoch(self, bar) -> None:
        """``--val-every``: validate (and keep the best) at this step, inside the epoch."""

        val = self.validate(self._snapshot())
        if val:
            c = self.cursor
            self.runlog.record({"kind": "val", "epoch": c.epoch, "step": c.step, "samples": c.samples,
                                "seen": c.step * self.cfg.batch_size, **val})
            bar.clear()
            self._say(f"step {c.step}: {val_line(val)}")

    def _heartbeat(self, parts: dict[str, float]) -> None:
        """Every --heartbeat seconds (bars off; rank 0): the step's news as a log line."""
        now = time.monotonic()
        if not self.pulse.due(now):
            return
        c = self.cursor
        log.info("%s", train_line(step=c.step, total_steps=self.total_steps, epoch=c.epoch + 1, epochs=self.cfg.epochs,
                                  samples=c.samples, batch_size=self.cfg.batch_size,
                                  images_per_sec=self.pulse.beat(now, self.trained), parts=parts, lr=_lr(self.optimizer)))

    def _say(self, line: str) -> None:
        """A line between the progress bar's frames (on a terminal), else a log line."""
        from tqdm import tqdm

        tqdm.write(line) if show_progress(self.cfg.progress) else log.info(line)

    # -- the loop
    def run(self) -> dict[str, Any]:
        with self.stop:  # SIGTERM / SIGINT: finish the step, checkpoint, raise Stopped
            return self._run()

    def _stop_wanted(self) -> bool:
        """A stop asked of this worker: its own signal (one process), or the driver's request in
        OUT (Ray Train workers have no signal of their own; on an object store, looked for at most
        every REQUEST_POLL_S)."""
        if self.stop.requested or self.world_size == 1:
            return self.stop.requested
        if is_uri(self.cfg.out):
            now = time.monotonic()
            if now - self._request_checked < REQUEST_POLL_S:
                return False
            self._request_checked = now
        return read_request(self.cfg.out) is not None

    def _stop_if_asked(self) -> None:
        if not self.stop.requested or self.done():  # (a stop at the last step is just the end)
            return
        if self.last_saved != self.cursor.step:
            self.save()
        c = self.cursor
        raise Stopped(f"stopped at step {c.step} (epoch {c.epoch + 1}, sample {c.samples} of it) with a checkpoint; "
                      "rerun the same command to resume from there", self.stop.signum)

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        try:
            if self.resumed_from is None and cfg.validates:
                # Where the student starts: the first point of the curve (the snapshot is a collective).
                val = self.validate(self._snapshot(optimizer=False), keep_best=False)
                if val:
                    self.runlog.record({"kind": "val", "epoch": 0, "step": 0, "samples": 0, "seen": 0, **val})
            while not self.done():
                self._epoch()
            if self.last_saved != self.cursor.step or self.trained == 0:
                self.save()  # the end state, and (on a rerun with nothing left to do) this run's summary
        finally:
            self.runlog.close()
        self.store.sync()  # (the last records, with OUT on an object store)
        return self.summary()

    def _epoch(self) -> None:
        """One epoch from the cursor, top to bottom: plan, then steps (each: the step, its logs,
        and what falls due inside the epoch), then the epoch's end."""
        cfg = self.cfg
        plan = self._plan_epoch()
        batches, bar = self._batches(plan), self._bar(plan)
        tally = _Tally()
        epoch_samples = plan.steps * cfg.batch_size
        for _ in range(plan.start_step, plan.steps):
            if self.done():
                break
            parts, index = self._step(batches)
            self._log_step(parts, index, tally, bar)
            if self.cursor.samples < epoch_samples:  # (at the epoch's last step the epoch's end covers these)
                self._mid_epoch(bar)
        bar.close()
        if self.cursor.samples == epoch_samples:  # (else stopped by --max-steps inside the epoch)
            self._end_epoch(tally)

    def _plan_epoch(self):
        """Which samples this rank reads, in which order, from the cursor on (pure: the order)."""
        from distill.train.order import plan_epoch

        cfg, world_size = self.cfg, self.world_size
        plan = plan_epoch(
            self.shards.rows, seed=cfg.seed, epoch=self.cursor.epoch, world_size=world_size, rank=self.rank,
            buffer=cfg.shuffle_buffer, global_batch=cfg.batch_size, partitions=cfg.partitions,
            samples=self.cursor.samples, exclude=self.prep.exclude,
        )
        if plan.steps == 0:
            raise BadOption(
                f"an epoch has no whole batch of {cfg.batch_size // world_size} per worker (training rows: "
                f"{self.prep.train_rows} over {world_size} workers); lower --batch-size or --workers"
            )
        return plan

    def _batches(self, plan):
        """The plan's batches, split over this rank's replicas."""
        from distill.train.stream import make_dataset

        cfg, shards, rank, world_size = self.cfg, self.shards, self.rank, self.world_size

        def dataset_fn(ctx):
            if ctx.num_input_pipelines != world_size or ctx.input_pipeline_id != rank:
                raise ValueError(f"input pipeline {ctx.input_pipeline_id}/{ctx.num_input_pipelines} is not rank {rank}/{world_size}")
            return make_dataset(shards, plan, seed=cfg.seed, flip=self.resolved.flip, view_prob=self.resolved.view_prob,
                                replica_batch=ctx.get_per_replica_batch_size(cfg.batch_size))

        return iter(self.strategy.distribute_datasets_from_function(dataset_fn))

    def _bar(self, plan):
        from tqdm import tqdm

        return tqdm(total=plan.steps, initial=plan.start_step, desc=f"epoch {self.cursor.epoch + 1}/{self.cfg.epochs}",
                    unit="step", disable=self.rank != 0 or not show_progress(self.cfg.progress), dynamic_ncols=True)

    def _step(self, batches) -> tuple[dict[str, float], Any]:
        """The step: one global batch, the stop vote carried in its all-reduce, the cursor moved on."""
        import tensorflow as tf

        parts, index = self.step_fn(next(batches), tf.constant(1.0 if self._stop_wanted() else 0.0))
        parts = {k: float(v) for k, v in parts.items()}
        if not math.isfinite(parts["loss"]):
            raise self._diverged(f"the loss is {parts['loss']} at step {self.cursor.step + 1} (epoch "
                                 f"{self.cursor.epoch + 1}), so the weights are no longer numbers")
        if parts.pop("stop") > 0 and not self.stop.requested:  # another worker's, or the driver's (Ray Train)
            self.stop.signum = read_request(self.cfg.out) or signal.SIGTERM
        self.cursor = replace(self.cursor, samples=self.cursor.samples + self.cfg.batch_size, step=self.cursor.step + 1)
        self.trained += self.cfg.batch_size
        self.last = parts
        return parts, index

    def _log_step(self, parts: dict[str, float], index, tally: "_Tally", bar) -> None:
        """The step's logs: the bar, the sample trace, the heartbeat, metrics.jsonl every --log-every."""
        cfg, c = self.cfg, self.cursor
        ips = tally.add(parts, cfg.batch_size)
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in parts.items()} | {"img/s": f"{ips:.0f}"}, refresh=False)
        if cfg.trace_samples:
            self.runlog.trace_step(c.step, c.epoch, index.numpy())
        self._heartbeat(parts)
        if c.step % cfg.log_every == 0:
            self.runlog.record({"kind": "step", "epoch": c.epoch, "step": c.step, "samples": c.samples, **parts,
                                "lr": _lr(self.optimizer), "images_per_sec": ips})
            tally.logged()

    def _mid_epoch(self, bar) -> None:
        """What falls due inside an epoch: validation every --val-every, a checkpoint every
        --checkpoint-every, and a stop asked for (a checkpoint at this step, then Stopped)."""
        cfg, step = self.cfg, self.cursor.step
        if cfg.val_every and step % cfg.val_every == 0:
            self._validate_mid_epoch(bar)
        if should_checkpoint(step, cfg.checkpoint_every):
            self.save()
        if self.stop.requested:
            bar.close()
            self._stop_if_asked()

    def _end_epoch(self, tally: "_Tally") -> None:
        """The epoch's record, validation (and OUT/best), the epoch-end checkpoint, a stop asked for."""
        cfg, c, seconds = self.cfg, self.cursor, tally.seconds()
        rec = {"kind": "epoch", "epoch": c.epoch, "step": c.step, "samples": c.samples, "seen": c.step * cfg.batch_size,
               **tally.means(), "steps_averaged": tally.steps,
               "images_per_sec": tally.steps * cfg.batch_size / max(seconds, 1e-9), "seconds": seconds}
        self.cursor = replace(c, epoch=c.epoch + 1, samples=0)
        state = self._snapshot()
        val = self.validate(state)
        if val:
            rec.update(val)
            self._say(f"epoch {self.cursor.epoch}/{cfg.epochs}: cos {rec.get('cos', float('nan')):.3f} | {val_line(val)}")
        self.runlog.record(rec)
        self.save(state, val)
        self._stop_if_asked()


class _Tally:
    """An epoch's running figures: the loss parts summed, steps, the pace since the last log line."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.since_log = 0, 0
        self.t_epoch = self.t_log = time.perf_counter()

    def add(self, parts: dict[str, float], batch_size: int) -> float:
        """Count a step; returns images/s since the last log line."""
        self.steps += 1
        self.since_log += 1
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self._now = time.perf_counter()
        return self.since_log * batch_size / max(self._now - self.t_log, 1e-9)

    def logged(self) -> None:
        self.t_log, self.since_log = self._now, 0

    def means(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.sums.items()}

    def seconds(self) -> float:
        return time.perf_counter() - self.t_epoch

def val_line(val: dict[str, float]) -> str:
    """The validation figures as the log shows them. Pure."""
    parts = []
    if "val_auc" in val:
        parts.append(f"held-out auc {val['val_auc']:.4f}" + (f" cos {val['val_cos']:.3f}" if "val_cos" in val else ""))
    for key in sorted(k for k in val if k.endswith("_acc") and k != "val_accuracy"):
        name = key[len("val_"):-len("_acc")]
        parts.append(f"{name} acc {val[key]:.4f} auc {val[f'val_{name}_auc']:.4f}")
    return ", ".join(parts) + (" (best)" if val.get("best") else "")


def train_loop(run: TrainRun, strategy, *, rank: int, world_size: int, store,
               stop: StopRequest | None = None) -> dict[str, Any]:
    """The loop every mode runs: restore, then epochs of steps from the cursor on. ``run``: the
    run as the driver resolved it (``distill.train.config.resolve``), without its schedule,
    which is fixed here once the held-out split is known.

    ``world_size``/``rank`` count input pipelines (one per worker process); the global batch
    splits evenly over all replicas. ``store`` saves and finds checkpoints (local or Ray).
    ``stop``: the caller's stop request, when it has one from before (a signal during
    start-up is then honoured at the first step).
    """
    return _Run(run, strategy, rank, world_size, store, stop).run()


def _lr(optimizer) -> float:
    return float(optimizer.learning_rate.numpy() if hasattr(optimizer.learning_rate, "numpy") else optimizer.learning_rate)
