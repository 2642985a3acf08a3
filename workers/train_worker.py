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
from typing import TYPE_CHECKING, Any

from distill.errors import BadOption, DistillError, Stopped
from distill.storage import is_uri

if TYPE_CHECKING:
    from distill.stopping import StopRequest
    from distill.train.checkpoints import Cursor
    from distill.train.config import TrainRun


class RayCheckpoints:
    """Checkpoints through Ray Train: persisted under the run's storage path, last few kept."""

    def __init__(self, rank: int, out: str, mirror=None, store_uri: str | None = None):
        self.rank, self.out = rank, out  # (OUT, or this worker's local copy of OUT on an object store)
        self.mirror = mirror  # rank 0 with OUT on a store: pushes its logs and best/ there
        self.store_uri = store_uri
        self._restored: str | None = None
        self._source = ""
        self._tmp: list[str] = []

    def latest(self) -> str | None:
        import ray.train

        from distill.train.checkpoints import latest_checkpoint, read_checkpoint, store_ray_checkpoint

        found = [(p, p) for p in [latest_checkpoint(self.out)] if p]
        if self.store_uri:  # a killed run's Ray Train checkpoints, on the store
            self._tmp.append(tempfile.mkdtemp(prefix="distill-ckpt-"))
            on_store = store_ray_checkpoint(self.store_uri, self._tmp[-1])
            found += [(on_store, f"{self.store_uri}/ray (Ray Train checkpoint)")] if on_store else []
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            self._tmp.append(ckpt.to_directory())  # a local copy, wherever the storage is
            found.append((self._tmp[-1], f"Ray Train checkpoint {ckpt.path}"))
        if not found:
            return None
        # The most steps wins (a later run with another worker count may have gone further).
        path, self._source = max(found, key=lambda f: read_checkpoint(f[0])[1].step)
        self._restored = path
        return path

    def describe(self, path: str) -> str:
        return self._source if path == self._restored else path

    def sync(self) -> None:
        if self.mirror is not None:
            self.mirror.push()

    def cleanup(self) -> None:
        for d in self._tmp:
            shutil.rmtree(d, ignore_errors=True)

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
        self.sync()  # (the logs up to this checkpoint, with OUT on an object store)
        return None


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import tensorflow as tf

    # First TF call of the process: the strategy must exist before any other op runs.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import ray.train

    from distill.train.loop import train_loop

    run = loop_config["run"]  # (the driver's TrainRun: no worker resolves it again)
    cfg = run.train
    if cfg.use_gpu:
        for g in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(g, True)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    if is_uri(cfg.out):  # OUT on an object store: each worker works in a local copy of its own
        from distill.mirror import run_mirror

        mirror = run_mirror(cfg.out, role=f"rank-{rank}")
        store = RayCheckpoints(rank, mirror.local, mirror if rank == 0 else None, store_uri=cfg.out)
    else:
        store = RayCheckpoints(rank, cfg.out)
    # The loop's last checkpoint carries its summary; Ray hands that to the driver.
    try:
        train_loop(run, strategy, rank=rank, world_size=ctx.get_world_size(), store=store)
    except Stopped:
        pass  # every worker stopped at the same step, after its checkpoint: the driver says so
    finally:
        store.cleanup()


def run_ray(run: "TrainRun", stop: "StopRequest | None" = None, adopt_into=None) -> dict[str, Any]:
    """Train ``run`` (resolved and checked by the driver, shipped to every worker as it is) with
    ``run.train.workers`` Ray Train workers; returns the loop's summary (rank 0).
    ``stop``: the caller's stop request (installed), else one of its own. ``adopt_into``: the
    ``LocalCheckpoints`` the run's last checkpoint is copied into (default: OUT's)."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from distill.stopping import StopRequest, clear_request, read_request, start_ray, write_request
    from distill.storage import store_env
    from distill.train.checkpoints import LocalCheckpoints, read_checkpoint

    cfg = run.train
    stop = stop or StopRequest("training")
    connected_here = not ray.is_initialized()
    if connected_here:
        # (a signal while Ray starts is a stop request, not Ray's exit)
        env = store_env()  # (the workers read and write OUT on an object store too)
        start_ray(stop, address=cfg.address or os.environ.get("RAY_ADDRESS"), log_to_driver=True,
                  **({"runtime_env": {"env_vars": env}} if env else {}))
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
    remote = is_uri(cfg.out)
    if not remote:
        os.makedirs(cfg.out, exist_ok=True)
    clear_request(cfg.out)  # (a request left by an earlier run's stop is not this run's)
    stop.on_request = lambda signum: write_request(cfg.out, signum)
    trainer = TensorflowTrainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={"run": run},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=f"{cfg.out}/ray" if remote else os.path.join(cfg.out, "ray"),  # (Ray writes s3:// itself)
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
        saved = (adopt_into or LocalCheckpoints(cfg.out, cfg.keep_checkpoints)).adopt(d)
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
