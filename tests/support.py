"""What the test suite and the benchmarks share: where the real test data is, the child
process environment, free ports, process trees, a private Ray head and a tiny teacher.

It lives with the tests, and ``bench/common.py`` imports it from here: tests never import
``bench/``. On a shared machine nothing may ``ray stop`` or kill by name, so every process is
found by a marker unique to one cluster or node (its mkdtemp'd ``--temp-dir``) on its command
line; process trees come from psutil (``/proc`` parsing by hand was what it replaced).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # ../shared beside the checkout: real faces and the real teacher
ORL = SHARED / "data" / "orl"
GLINT12 = SHARED / "data" / "glint12"
MOBILEFACENET = SHARED / "teachers" / "mobilefacenet"

# Child processes: quiet TF, no usage stats, no token auth on our loopback-only clusters,
# unbuffered output for the logs of killed runs.
CHILD_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "PYTHONUNBUFFERED": "1",
}


# Ray forwards its actors' output to the driver as "(Name pid=N[, ip=A]) ...", coloured on a tty.
_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\(\S+ pid=\d+(, ip=\S+)?\)")


def own_lines(text: str) -> list[str]:
    """The lines a driver process wrote itself, without those Ray forwarded from its actors."""
    return [line for line in text.splitlines() if not _FORWARDED.match(line)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_lines() -> dict[int, str]:
    """{pid: command line} of every process we can read."""
    out = {}
    for p in psutil.process_iter(["cmdline"]):
        out[p.pid] = " ".join(p.info["cmdline"] or ())
    return out


def process_tree(marker: str) -> set[int]:
    """The processes whose command line names ``marker``, and all their descendants (one Ray
    node: `ray start`, raylet, GCS, agents, log monitor and workers). Never this process."""
    me = os.getpid()
    pids: set[int] = set()
    for pid, cmd in command_lines().items():
        if marker in cmd and pid != me:
            pids.add(pid)
            try:
                pids |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
    return pids - {me}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_tree(marker: str, *, grace: float = 10.0) -> int:
    """Stop :func:`process_tree` (``marker``): SIGTERM, up to ``grace`` s to exit, then SIGKILL;
    ``grace=0`` is SIGKILL at once (a machine dying). Returns how many processes there were.
    The tree is taken before the first signal: children orphaned by it still get the second."""
    import signal

    pids = process_tree(marker)
    for sig in ((signal.SIGTERM, signal.SIGKILL) if grace > 0 else (signal.SIGKILL,)):
        for pid in pids | process_tree(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.2)
    return len(pids)


class RayHead:
    """``ray start --head`` with its own temp dir and port; stopped by :func:`kill_tree` of
    its temp dir (``ray stop`` would kill other sessions' clusters on this shared machine)."""

    def __init__(self, num_cpus: int | None = None):
        self.num_cpus = num_cpus or os.cpu_count() or 1
        self.temp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # Ray's socket paths must stay short
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def __enter__(self) -> "RayHead":
        # Every port its own (Ray's defaults, 10001 and 52365, are one per machine): heads of
        # parallel test sessions (pytest -n) and benchmarks run side by side.
        cmd = ["ray", "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={self.num_cpus}", "--include-dashboard=false", "--disable-usage-stats",
               f"--temp-dir={self.temp}", f"--ray-client-server-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=180, env={**os.environ, **CHILD_ENV})
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        # Ray's GCS server and raylet take SIGTERM but do not exit on it within 10 s: 2 s of grace,
        # then SIGKILL (a test cluster's state is thrown away with its temp dir).
        kill_tree(self.temp, grace=2)
        # The Ray Client server is started detached and names only the head's address in its
        # command line, not the temp dir: without this it outlives every test session.
        kill_tree(f":{self.port} ", grace=2)
        shutil.rmtree(self.temp, ignore_errors=True)


def orl_jpegs(people: int, per_person: int, size: int = 112) -> list[list[bytes]]:
    """The first ORL people's first images as RGB JPEGs, one list per person (the shape
    ``write_insightface_rec`` takes)."""
    import io

    from PIL import Image

    out = []
    for person in range(1, people + 1):
        imgs = []
        for i in range(1, per_person + 1):
            buf = io.BytesIO()
            Image.open(ORL / f"s{person}" / f"{i}.pgm").convert("RGB").resize((size, size)).save(buf, "JPEG", quality=90)
            imgs.append(buf.getvalue())
        out.append(imgs)
    return out


def build_tiny_teacher(out: Path, dim: int = 512, size: int = 112, seed: int = 0) -> Path:
    """A two-conv random teacher with a ``dim``-d output: real shards in seconds, when what is
    measured or tested is the data around the teacher, not the teacher."""
    if (out / "saved_model.pb").exists():
        return out
    import keras

    from distill.teacher import export_keras_teacher

    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 5, strides=4, activation="relu")(inp)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_keras_teacher(keras.Model(inp, keras.layers.Dense(dim)(x)), str(tmp))
    os.replace(tmp, out)
    return out


def write_tiny_bin(path: Path, pairs: int = 20) -> Path:
    """A verification .bin in insightface's layout (a pickle of JPEG bytes and is-same flags):
    ORL pairs, alternating same person / two different people."""
    import io
    import pickle

    from PIL import Image

    def jpeg(p, k):
        buf = io.BytesIO()
        Image.open(ORL / f"s{p}" / f"{k}.pgm").convert("RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue()

    bins, issame = [], []
    for n in range(pairs):
        p = n % 10 + 1
        if n % 2 == 0:
            bins += [jpeg(p, 1 + n % 5), jpeg(p, 6 + n % 5)]
            issame.append(True)
        else:
            bins += [jpeg(p, 1), jpeg(p % 10 + 11, 2)]
            issame.append(False)
    path.write_bytes(pickle.dumps((bins, issame), protocol=2))
    return path
