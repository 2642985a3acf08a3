"""Training checkpoints: ``RUN/student/checkpoints/ckpt-<step>``.

A checkpoint is a directory written under a temp name, fsynced and renamed into place, so a
name that exists is whole: the weights and optimizer state (``state.npz``, variables by
path), the data cursor (``cursor.json``: epoch, samples consumed in it, global step,
and what fixes the order: seed, world size, global batch, shards, buffer) and the resolved
config (``config.json``). ``train`` writes and resumes from them, ``export`` reads the
latest (or, with ``--best``, ``RUN/student/best``: the checkpoint of the epoch that scored
best on the held-out people, with its scores in ``val.json``), and a Ray Train run's
checkpoints are adopted here so both find every run's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from distill.errors import IncompatibleRun

CHECKPOINTS = "checkpoints"
RAY_DIR = "ray"  # Ray Train's storage path under OUT
BEST = "best"
VAL = "val.json"


@dataclass(frozen=True)
class Cursor:
    """Where training is: a few integers from which the data order is recomputed."""

    epoch: int
    samples: int  # consumed in this epoch, over all workers (= steps in epoch * global batch)
    step: int  # global optimizer steps so far
    seed: int
    world_size: int
    global_batch: int
    shuffle_buffer: int
    shards_run_id: str



def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:09d}"


def list_checkpoints(ckpt_dir: str) -> list[str]:
    """Complete checkpoints (renamed into place, so whole), oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("ckpt-") and os.path.isfile(os.path.join(ckpt_dir, n, "cursor.json")))
    return [os.path.join(ckpt_dir, n) for n in names]


def ray_checkpoints(student_dir: str) -> list[str]:
    """Ray Train's copies (``OUT/ray/<run>/checkpoint_*``, written by several workers) that are
    whole: an upload killed half way is passed over."""
    import glob
    import zipfile

    found = []
    for d in glob.glob(os.path.join(student_dir, RAY_DIR, "*", "checkpoint_*")):
        files = [os.path.join(d, n) for n in ("config.json", "cursor.json", "state.npz")]
        if all(os.path.isfile(f) for f in files) and zipfile.is_zipfile(files[2]):
            found.append(d)
    return found


def store_ray_checkpoint(uri: str, dest: str) -> str | None:
    """The Ray Train checkpoint of the most steps under ``URI/ray`` on an object store, whole
    (its three files there: each object is whole once it exists), downloaded into ``dest``."""
    import pyarrow.fs as pafs

    from distill.storage import ArrowStorage

    store = ArrowStorage.from_uri(uri, create=False)
    infos = store.fs.get_file_info(pafs.FileSelector(f"{store.path}/{RAY_DIR}", recursive=True, allow_not_found=True))
    names: dict[str, set[str]] = {}
    for i in infos:
        if i.type == pafs.FileType.File:
            d, _, name = i.path.rpartition("/")
            names.setdefault(d, set()).add(name)
    steps = []
    for d, have in names.items():
        if d.rpartition("/")[2].startswith("checkpoint_") and {"config.json", "cursor.json", "state.npz"} <= have:
            with store.fs.open_input_stream(f"{d}/cursor.json") as f:
                steps.append((Cursor(**json.load(f)).step, d))
    if not steps:
        return None
    src = max(steps)[1]
    os.makedirs(dest, exist_ok=True)
    for name in ("config.json", "cursor.json", "state.npz"):
        with store.fs.open_input_stream(f"{src}/{name}") as f, open(os.path.join(dest, name), "wb") as g:
            shutil.copyfileobj(f, g, 1 << 22)
    return dest


def latest_checkpoint(student_dir: str) -> str | None:
    """The checkpoint of the most steps a run in ``student_dir`` has written, whether by one
    process (``OUT/checkpoints``) or by Ray Train workers (``OUT/ray``): a run goes on from
    there with any worker count."""
    found = list_checkpoints(os.path.join(student_dir, CHECKPOINTS)) + ray_checkpoints(student_dir)
    steps = []
    for path in found:
        try:
            steps.append((read_checkpoint(path)[1].step, path.startswith(os.path.join(student_dir, CHECKPOINTS)), path))
        except (OSError, ValueError, TypeError):  # a damaged copy: another one will do
            continue
    return max(steps)[2] if steps else None  # (on equal steps, the local copy)


def read_checkpoint(path: str) -> tuple[dict[str, Any], Cursor]:
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "cursor.json")) as f:
        cursor = Cursor(**json.load(f))
    return config, cursor


def write_checkpoint_files(path: str, state: dict[str, np.ndarray], config: dict, cursor: Cursor) -> None:
    np.savez(os.path.join(path, "state.npz"), **state)
    for name, obj in (("config.json", config), ("cursor.json", asdict(cursor))):
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f:
            os.fsync(f.fileno())


def snapshot(model, optimizer=None) -> dict[str, np.ndarray]:
    """Weights and optimizer state as arrays keyed by variable path (``model/<layer>/<name>``,
    ``optimizer/<path>``): restored by name, so no graph change can load a tensor into the
    wrong variable because it happens to sit at the same position with the same shape."""
    state = {f"model/{_name(v, 'model')}": np.asarray(v.numpy()) for v in model.weights}
    if optimizer is not None:
        state.update({f"optimizer/{_name(v, 'optimizer')}": np.asarray(v.numpy()) for v in optimizer.variables})
    return state


def not_finite(state: dict[str, np.ndarray]) -> list[str]:
    """The keys of ``state`` whose floating-point arrays hold a nan or an infinity: weights no
    checkpoint may keep (the step after a resume would start from them)."""
    return sorted(k for k, a in state.items() if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all())


def _name(v, prefix: str) -> str:
    """A variable's key: its path (``layer/name``); an optimizer's variables without the
    optimizer's own name (``adam``, or ``adam_1`` for the second one in a process)."""
    return v.path.split("/", 1)[-1] if prefix == "optimizer" else v.path


def _assign(variables, state, prefix: str, where: str) -> None:
    """Every variable from its own key; a key missing, left over or of another shape is an error."""
    keys = {k[len(prefix) + 1:]: k for k in state if k.startswith(prefix + "/")}
    if not keys and any(k.startswith(prefix + ".") for k in state):
        raise IncompatibleRun(f"{where} was written by an older distill (variables by position, not by name); "
                              "train into a new --out directory")
    paths = [_name(v, prefix) for v in variables]
    missing, extra = sorted(set(paths) - set(keys)), sorted(set(keys) - set(paths))
    if missing or extra:
        raise IncompatibleRun(
            f"{where} does not match this {prefix}: {len(missing)} variable(s) missing from it (e.g. "
            f"{', '.join(missing[:3]) or '-'}), {len(extra)} it has that this graph lacks (e.g. {', '.join(extra[:3]) or '-'}); "
            "it was written by another architecture: use a new --out directory")
    for v, path in zip(variables, paths):
        value = state[keys[path]]
        if tuple(value.shape) != tuple(v.shape):
            raise IncompatibleRun(f"{where}: {prefix} variable {v.path} is {tuple(v.shape)}, the checkpoint has "
                                  f"{tuple(value.shape)}; use a new --out directory")
        v.assign(value)


def assign_model(model, state: dict[str, np.ndarray], where: str = "the snapshot") -> None:
    """Load a snapshot's model weights, by name, into a model built from the same spec."""
    _assign(model.weights, state, "model", where)


def average_key(path: str) -> str:
    """The snapshot key of a trainable variable's moving average (``--ema``): Keras keeps it as
    the optimizer variable ``<path, / as _>_average``. Pure."""
    return f"optimizer/{path.replace('/', '_')}_average"


def averaged(state: dict[str, np.ndarray], trainable: list[str], where: str = "the snapshot") -> dict[str, np.ndarray]:
    """The weights to judge and ship: ``state`` with each trainable variable (paths ``trainable``)
    replaced by its moving average where the run kept them (``--ema``), else ``state`` itself.
    Batch-norm statistics are not trained and stay as they are. Pure."""
    keys = {f"model/{path}": average_key(path) for path in trainable}
    have = [k for k in keys.values() if k in state]
    if not have:
        return state
    if len(have) != len(keys):
        raise IncompatibleRun(f"{where} keeps moving averages (--ema) for {len(have)} of the student's {len(keys)} "
                              "trainable variables; it was written by another architecture: use a new --out directory")
    return {**state, **{m: state[a] for m, a in keys.items()}}


def _read_state(path: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(path, "state.npz")) as z:
        return {k: z[k] for k in z.files}


def load_student(model, path: str) -> None:
    """The student of a checkpoint, to judge or ship: its weights, or with ``--ema`` their averages."""
    state = _read_state(path)
    assign_model(model, averaged(state, [v.path for v in model.trainable_variables], path), path)


def restore(model, optimizer, path: str) -> None:
    """A run's state, to train on: the model's last weights and the optimizer's variables."""
    state = _read_state(path)
    _assign(model.weights, state, "model", path)
    _assign(optimizer.variables, state, "optimizer", path)


class LocalCheckpoints:
    """``OUT/checkpoints/ckpt-<step>``: temp dir + fsync + rename, the last few kept. With a
    ``mirror`` (OUT on an object store), ``out`` is its local copy and each save, and each
    ``sync``, makes the store match it."""

    def __init__(self, out: str, keep: int, mirror=None):
        self.out = out
        self.dir = os.path.join(out, CHECKPOINTS)
        self.keep = keep
        self.mirror = mirror

    def sync(self) -> None:
        """The store made to match OUT's local copy (after a checkpoint, ``best/``, the end)."""
        if self.mirror is not None:
            self.mirror.push()

    def latest(self) -> str | None:
        return latest_checkpoint(self.out)

    def describe(self, path: str) -> str:
        return path

    def save(self, state, config, cursor: Cursor, metrics: dict) -> str:
        os.makedirs(self.dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".ckpt-", suffix=".tmp", dir=self.dir)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; checkpoints are for export and others
        write_checkpoint_files(tmp, state, config, cursor)
        final = self._publish(tmp, cursor.step)
        self.sync()
        return final

    def adopt(self, src: str) -> str:
        """Copy a finished checkpoint (Ray Train's) in, so export finds every run's here."""
        _, cursor = read_checkpoint(src)
        os.makedirs(self.dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".ckpt-", suffix=".tmp", dir=self.dir)
        os.chmod(tmp, 0o755)
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        final = self._publish(tmp, cursor.step)
        self.sync()
        return final

    def _publish(self, tmp: str, step: int) -> str:
        from distill.storage import publish_dir

        # (The same step again, an epoch end after a periodic save or a rerun of a finished run,
        # replaces the old one whole.)
        final = os.path.join(self.dir, checkpoint_name(step))
        publish_dir(tmp, final)
        for old in list_checkpoints(self.dir)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for name in os.listdir(self.dir):  # leftovers, including saves killed before their rename
            if name.startswith(".ckpt-") and (name.endswith(".tmp") or ".old-" in name):
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)
        return final


# ---------------------------------------------------------------- the best epoch, and --init


def write_best(out: str, state: dict[str, np.ndarray], config: dict, cursor: Cursor, val: dict) -> str:
    """``OUT/best``: the checkpoint that scored best on validation, replaced whole (temp + rename):
    the model as it was judged (with ``--ema``, ``state`` holds the averages), no optimizer."""
    from distill.storage import publish_dir

    tmp = tempfile.mkdtemp(prefix=".best-", suffix=".tmp", dir=out)
    os.chmod(tmp, 0o755)
    write_checkpoint_files(tmp, {k: v for k, v in state.items() if k.startswith("model/")}, config, cursor)
    with open(os.path.join(tmp, VAL), "w") as f:
        json.dump(val, f, indent=1, sort_keys=True)
    final = os.path.join(out, BEST)
    publish_dir(tmp, final)
    return final


def read_best_val(out: str) -> dict | None:
    try:
        with open(os.path.join(out, BEST, VAL)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def find_checkpoint(path: str) -> str:
    """A checkpoint directory from what a user would point at: a checkpoint (``ckpt-*``,
    ``best``), a student directory (its latest), or an export (the checkpoint it copied)."""
    if os.path.isfile(os.path.join(path, "cursor.json")):
        return path
    for inner in (os.path.join(path, "checkpoint"),):  # an export directory
        if os.path.isfile(os.path.join(inner, "cursor.json")):
            return inner
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise FileNotFoundError(
        f"{path} holds no student checkpoint: pass a `distill train` output directory, one of its "
        "checkpoints/ckpt-* or best/ directories, a `distill export` directory, or a Keras .h5 weights file"
    )
