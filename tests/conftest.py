"""Session fixtures shared by both test tiers.

- ``ray_address``: one local Ray head per session (``ray start``), so CLI subprocesses and
  in-process tests connect with ``--address`` instead of paying ~5 s for their own cluster.
- ``tiny_teacher``: a small random-weight teacher SavedModel (112x112 -> 32-d), built once.
- ``orl_listing`` / ``embedded_run``: the real ORL faces listed and embedded by the real CLI.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ORL = SHARED / "data" / "orl"
MOBILEFACENET = SHARED / "teachers" / "mobilefacenet"

# Ray turns token auth on once ~/.ray/auth_token exists; the test clusters are loopback-only
# and short-lived, so every process of the session says explicitly that auth is off.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m distill ARGS`` as a real process; output captured for asserts."""
    proc = subprocess.run(
        [sys.executable, "-m", "distill", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"distill {' '.join(map(str, args))} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def ray_address():
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    cmd = ["ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=4",
           "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    address = f"127.0.0.1:{port}"
    try:
        yield address
    finally:
        stop_ray_cluster(temp)


def stop_ray_cluster(temp_dir: str) -> None:
    """Stop only the Ray cluster started with this --temp-dir.

    `ray stop` kills every Ray process on the machine, including clusters of other test
    sessions; the cluster's own processes name their temp dir on their command line, and its
    workers exit with their raylet.
    """
    import signal
    import time

    def pids() -> list[int]:
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if temp_dir.encode() in f.read():
                            out.append(int(entry))
                except OSError:
                    continue
        return out

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while pids() and time.monotonic() < deadline:
            time.sleep(0.2)
    shutil.rmtree(temp_dir, ignore_errors=True)


def build_tiny_teacher(out: Path, dim: int = 32, size: int = 112, seed: int = 0) -> Path:
    """A deterministic random-weight conv net exported like a real face teacher."""
    import keras

    from distill.teacher import export_keras_teacher

    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 5, strides=4, activation="relu")(inp)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out_ = keras.layers.Dense(dim)(x)
    export_keras_teacher(keras.Model(inp, out_), str(out))
    return out


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return build_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny")


@pytest.fixture(scope="session")
def orl_listing(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("orl") / "listing.parquet"
    run_cli("listing", ORL, "--out", out)
    return out


@pytest.fixture(scope="session")
def embedded_run(tmp_path_factory, ray_address, tiny_teacher, orl_listing) -> Path:
    """Shard dir of a real `distill embed` of the 400 ORL faces with the tiny teacher."""
    out = tmp_path_factory.mktemp("orl-run") / "shards"
    run_cli("embed", orl_listing, "--teacher", tiny_teacher, "--out", out, "--shard-size", "64",
            "--batch-size", "32", "--address", ray_address, "--no-progress")
    return out
