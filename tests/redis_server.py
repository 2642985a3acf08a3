"""A real ``redis-server`` for tests: free loopback port, its own temp dir, optional password
and persistence; can be stopped (gracefully or SIGKILL), restarted on the same port and data
dir, and flushed. Tests talk to the Debian package's binary, never to a mock.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

from support import free_port


def require_redis_server() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        import pytest  # (imported here: bench/faults.py uses this server outside pytest)

        pytest.fail("redis-server is not installed; run `apt-get install -y redis-server` (.ci/run does)")
    return exe


class RedisServer:
    """``with RedisServer(tmp_path, password="s3cret", appendonly=True) as rs: rs.url``."""

    def __init__(self, data_dir: str | os.PathLike | None = None, *, password: str | None = None,
                 appendonly: bool = False, port: int | None = None):
        self.exe = require_redis_server()
        self._own_dir = data_dir is None
        self.dir = str(data_dir) if data_dir is not None else tempfile.mkdtemp(prefix="redis-test-")
        os.makedirs(self.dir, exist_ok=True)
        self.password = password
        self.appendonly = appendonly
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    # -- addresses
    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, decode_responses=True)

    # -- lifecycle
    def start(self, timeout: float = 10.0) -> "RedisServer":
        args = [
            self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
            "--daemonize", "no", "--save", "", "--logfile", os.path.join(self.dir, "redis.log"),
            # every write reaches the AOF before the reply: a SIGKILL loses nothing
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {err}\n{self.log()}")
            try:
                if self.client().ping():
                    return self
            except Exception as e:
                if time.monotonic() > deadline:
                    self.stop(kill=True)
                    raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout}s\n{self.log()}") from e
                time.sleep(0.02)

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)  # SIGTERM: graceful, AOF flushed
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self, kill: bool = False) -> "RedisServer":
        """Same port, same data dir: with appendonly the data survives."""
        self.stop(kill=kill)
        return self.start()

    def flush(self) -> None:
        self.client().flushall()

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log")) as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
