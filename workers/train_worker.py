"""Ray Train side of ``distill train --workers N``: the driver call and the per-worker loop.

``run_ray`` starts a ``TensorflowTrainer`` (one process per worker, ``TF_CONFIG`` set by Ray)
under ``RunConfig(name, storage_path=OUT/ray)``. A rerun goes on from the newest checkpoint
in OUT, whichever worker count wrote it: Ray Train's own (``ray.train.get_checkpoint``, after a
restart) or one in ``OUT/checkpoints`` / ``OUT/ray`` (``latest_checkpoint``; Ray Train keeps
its storage where every worker can read it, and OUT/ray is under OUT). Each worker builds a
MultiWorkerMirroredStrategy and runs the same ``distill.train.loop.train_loop`` as a
single-process run; only where checkpoints go differs (``RayCheckpoints``: rank 0 hands
each one to ``ray.train.report``, every rank reports so the barrier lines up).

Hands on: the run's last checkpoint copied into ``OUT/checkpoints`` (where ``export`` looks)
and the summary the loop returned.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from distill.errors import BadOption, DistillError, Stopped

if TYPE_CHECKING:
    from distill.stopping import StopRequest
    from distill.train.checkpoints import Cursor
    from distill.train.config import TrainConfig


class RayCheckpoints:
    """Checkpoints through Ray Train: persisted under the run's storage path, last few kept."""

    def __init__(self, rank: int, out: str):
        self.rank, self.out = rank, out
        self._restored: str | None = None
        self._source = ""

    def latest(self) -> str | None:
        import ray.train

        from distill.train.checkpoints import latest_checkpoint, read_checkpoint

        found = latest_checkpoint(self.out)
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return found
        self._source = ckpt.path
        self._restored = ckpt.to_directory()  # a local copy, wherever the storage is
        if found is not None and read_checkpoint(found)[1].step > read_checkpoint(self._restored)[1].step:
            return found  # a later run with another worker count went further
        return self._restored

    def describe(self, path: str) -> str:
        return f"Ray Train checkpoint {self._source}" if path == self._restored else path

    def cleanup(self) -> None:
        if self._restored:
            shutil.rmtree(self._restored, ignore_errors=True)

    def save(self, state, config: dict, cursor: "Cursor", metrics: dict) -> str | None:
        import ray.train
        from ray.train import Checkpoint

        from distill.train.checkpoints import write_checkpoint_files

        if self.rank != 0:
            ray.train.report(metrics)  # every rank reports the same number of times
            return None
        tmp = tempfile.mkdtemp(prefix="distill-ckpt-")
        try:
            write_checkpoint_files(tmp, state, config, cursor)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return None


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import tensorflow as tf

    # First TF call of the process: the strategy must exist before any other op runs.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import ray.train

    from distill.train.config import TrainConfig
    from distill.train.loop import train_loop

    if loop_config["train"]["use_gpu"]:
        for g in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(g, True)
    ctx = ray.train.get_context()
    cfg = TrainConfig(**loop_config["train"])
    store = RayCheckpoints(ctx.get_world_rank(), cfg.out)
    # The loop's last checkpoint carries its summary; Ray hands that to the driver.
    try:
        train_loop(cfg, strategy, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), store=store)
    except Stopped:
        pass  # every worker stopped at the same step, after its checkpoint: the driver says so
    finally:
        store.cleanup()


def run_ray(cfg: "TrainConfig", stop: "StopRequest | None" = None) -> dict[str, Any]:
    """Train with ``cfg.workers`` Ray Train workers; returns the loop's summary (rank 0).
    ``stop``: the caller's stop request (installed), else one of its own."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from distill.stopping import StopRequest, clear_request, read_request, start_ray, write_request
    from distill.train.checkpoints import LocalCheckpoints, read_checkpoint

    stop = stop or StopRequest("training")
    connected_here = not ray.is_initialized()
    if connected_here:
        # (a signal while Ray starts is a stop request, not Ray's exit)
        start_ray(stop, address=cfg.address or os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    if stop.requested:
        raise Stopped("stopped before the first step (nothing trained, nothing to save); rerun the same command to "
                      "start", stop.signum)
    resources = ray.cluster_resources()
    need = {"CPU": cfg.workers, **({"GPU": cfg.workers} if cfg.use_gpu else {})}
    for kind, n in need.items():
        if resources.get(kind, 0) < n:
            # Ray would wait forever for workers it cannot place; say so now instead.
            raise BadOption(
                f"--workers {cfg.workers} needs {n} {kind}s but the Ray cluster has {resources.get(kind, 0):g}; "
                "lower --workers, or add nodes" + ("" if kind == "CPU" else ", or drop --use-gpu")
            )
    # SIGTERM / SIGINT reach this process only: it asks the workers to stop through OUT, where
    # they agree on the step (distill.train.loop), checkpoint it and return; then this says so.
    os.makedirs(cfg.out, exist_ok=True)
    clear_request(cfg.out)  # (a request left by an earlier run's stop is not this run's)
    stop.on_request = lambda signum: write_request(cfg.out, signum)
    trainer = TensorflowTrainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={"train": asdict(cfg)},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=os.path.join(cfg.out, "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    try:
        with stop:  # (over Ray's own handler, which would abort)
            result = trainer.fit()
    except Exception as e:
        user = _user_error(e)
        if user is None:
            raise
        raise user from e
    finally:
        signum = read_request(cfg.out)
        clear_request(cfg.out)
        if connected_here:
            # Done with the cluster: disconnect, so the actors Ray Train leaves behind (its
            # placement-group cleaner logs for a while after the controller ends) cannot
            # forward lines after this command's last one.
            ray.shutdown()
    if result.checkpoint is None:
        raise ValueError(f"Ray Train run {cfg.run_name} under {cfg.out}/ray finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        saved = LocalCheckpoints(cfg.out, cfg.keep_checkpoints).adopt(d)
    if signum is not None:
        c = read_checkpoint(saved)[1]
        if c.epoch < cfg.epochs and (cfg.max_steps is None or c.step < cfg.max_steps):
            raise Stopped(f"stopped at step {c.step} (epoch {c.epoch + 1}, sample {c.samples} of it) on every worker, "
                          "with a checkpoint; rerun the same command to resume from there", signum)
    return result.metrics


def _user_error(e: Exception) -> Exception | None:
    """The error a worker raised that the user can fix (a ``DistillError``: a bad option, an
    incompatible resume; or a missing file), with its own type, for the CLI to print in one line."""
    for failure in getattr(e, "worker_failures", {}).values():
        cause = getattr(failure, "cause", failure)  # in case Ray hands a RayTaskError wrapper
        if isinstance(cause, (DistillError, FileNotFoundError)):
            return cause
    return None
