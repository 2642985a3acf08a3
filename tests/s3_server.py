"""A real S3 API server for tests: ``moto`` in server mode (``python -m moto.server``, the approach Ray's own
tests take) on a free loopback port, as its own process; it can be killed and restarted on the
same port (its buckets live in memory, so a restart empties them, like losing the store).

``env`` is what a user's shell would hold: ``AWS_ENDPOINT_URL`` (S3-compatible stores: MinIO,
R2), dummy credentials and a region. Every ``distill`` process a test starts gets it.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

from support import free_port

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
                  "AWS_EC2_METADATA_DISABLED": "true"}


class S3Server:
    """``with S3Server() as s3: s3.make_bucket("b"); run_cli(..., env=s3.env)``."""

    def __init__(self, port: int | None = None):
        # From this interpreter, never from PATH: a virtualenv that is not activated would
        # otherwise start the machine's own moto, which may be another version.
        if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
            import pytest

            pytest.fail(f"moto's server is not installed for {sys.executable}; run `pip install 'moto[server]'` "
                        "(the test extra has it)")
        self.exe = [sys.executable, "-m", "moto.server"]
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1", **S3_CREDENTIALS}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing-key-id", aws_secret_access_key="testing-secret-key")

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every key under ``prefix`` with its size (pyarrow's empty ``dir/`` markers left out)."""
        out, token = {}, None
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = self.client().list_objects_v2(**kw)
            out.update({o["Key"]: o["Size"] for o in page.get("Contents", []) if not o["Key"].endswith("/")})
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def get(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-3000:]

    def start(self, timeout: float = 20.0) -> "S3Server":
        # Its log (a line per request) goes to a file: a pipe nobody reads would fill and stall it.
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([*self.exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}: {self.log()}")
            try:
                self.client().list_buckets()
                return self
            except Exception as e:
                if time.monotonic() > deadline:
                    self.stop(kill=True)
                    raise RuntimeError(f"moto_server on port {self.port} did not answer in {timeout}s") from e
                time.sleep(0.1)

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(kill=True)


class Outage:
    """A loopback TCP relay in front of the S3 server that can go down and come back up on the
    same port: what a client sees when its store dies and restarts (open connections reset, new
    ones reset at once, then answered again), with the store's contents kept, which a restarted
    in-memory moto_server would not.

    ``with Outage(s3) as relay: run_cli(..., env=relay.env); relay.down(); relay.up()``."""

    def __init__(self, server: S3Server):
        self.server, self.port = server, free_port()
        self._listener: socket.socket | None = None
        self._refuser: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.refused = 0  # connections reset while down: the client tried the store during the outage

    @property
    def env(self) -> dict[str, str]:
        return {**self.server.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}"}

    def _listen(self) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        return listener

    def up(self) -> None:
        refuser, self._refuser = self._refuser, None
        _close_listener(refuser)
        self._listener = self._listen()
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def down(self) -> None:
        """Reset every open connection, and every new one until ``up`` (counted in ``refused``)."""
        listener, self._listener = self._listener, None
        _close_listener(listener)
        with self._lock:
            conns, self._open = self._open, set()
        for c in conns:
            _reset(c)
        self._refuser = self._listen()
        threading.Thread(target=self._refuse, args=(self._refuser,), daemon=True).start()

    def _refuse(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by up()
                return
            self.refused += 1
            _reset(client)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by down()
                return
            try:
                backend = socket.create_connection(("127.0.0.1", self.server.port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # went down meanwhile
                    client.close()
                    backend.close()
                    continue
                self._open |= {client, backend}
            for a, b in ((client, backend), (backend, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for c in (src, dst):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "Outage":
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        for listener in (self._listener, self._refuser):
            _close_listener(listener)
        self._listener = self._refuser = None
        with self._lock:
            conns, self._open = self._open, set()
        for c in conns:
            _reset(c)


def _close_listener(listener: socket.socket | None) -> None:
    """Close a listening socket and free its port at once: shutdown wakes the thread blocked in
    its accept (a bare close would leave the port bound until that accept returned)."""
    if listener is None:
        return
    try:
        listener.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    listener.close()


def _reset(conn: socket.socket) -> None:
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        conn.close()
    except OSError:
        pass


if __name__ == "__main__":  # a server for trying things by hand: python tests/s3_server.py
    with S3Server() as s3:
        print(" ".join(f"{k}={v}" for k, v in s3.env.items()), file=sys.stderr)
        s3.proc.wait()
