"""`distill embed` with the Redis ledger under failures, every listing row in exactly one shard:
a worker node of a real multi-node Ray cluster dies mid-run; Redis is SIGKILLed and restarted
mid-run; Redis is flushed and rebuilt from the shard files.

Head + two worker nodes, each started by `ray start` with its own --temp-dir and ports, so
this cluster can be told apart from the session cluster other tests use and torn down alone
(`ray stop` would kill every Ray process on the machine). Token auth is on, with the token
in a temp file named by RAY_AUTH_TOKEN_PATH in the environment of every process.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distill.shards.manifest import load_manifest
from distill.shards.plan import parse_shard_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from redis_server import RedisServer  # noqa: E402
from support import command_lines, free_port, kill_tree, process_tree  # noqa: E402

pytestmark = pytest.mark.integration

ROWS, SHARD_SIZE = 400, 8  # the ORL faces: 50 shards


# ---------------------------------------------------------------- processes, by command line

def busy_on(marker: str, method: str) -> int:
    """Worker processes of one node running ``method`` now (Ray titles them ray::Class.method)."""
    cmds = command_lines()
    return sum(1 for p in process_tree(marker) if cmds.get(p, "").startswith(f"ray::{method}"))


# ---------------------------------------------------------------- the cluster

class LocalCluster:
    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env, self.log_dir = env, log_dir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dirs: list[str] = []

    def _start(self, *args: str, head: bool = False) -> tuple[subprocess.Popen, Path]:
        temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # Ray's socket paths must stay short
        self.dirs.append(temp)
        cmd = ["ray", "start", "--node-ip-address=127.0.0.1", "--num-cpus=1", f"--temp-dir={temp}",
               f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats", *args]
        if head:
            cmd += ["--head", f"--port={self.port}", "--include-dashboard=false", f"--dashboard-port={free_port()}",
                    f"--ray-client-server-port={free_port()}"]
        else:
            cmd += [f"--address={self.address}"]
        # Output to a file: the daemons `ray start` leaves behind may inherit it, and a pipe
        # would then never reach EOF.
        log = self.log_dir / f"ray-start-{len(self.dirs)}.log"
        with open(log, "w") as f:
            return subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT), log

    def _start_node(self, *args: str, head: bool = False) -> str:
        """Start one node; retried once, since Ray gives a raylet 30 s to register and a
        loaded 2-core machine sometimes needs longer. Returns its temp dir."""
        for _ in range(2):
            p, log = self._start(*args, head=head)
            if p.wait(timeout=300) == 0:
                return self.dirs[-1]
            kill_tree(self.dirs[-1], grace=0)  # whatever half-started
        raise AssertionError(f"ray start {' '.join(args)} exited {p.returncode}:\n{log.read_text()[-3000:]}")

    def start(self, worker_resources: list[str]) -> list[str]:
        """Head, then the workers one by one (in parallel they starve each other here).
        Returns each worker's temp dir."""
        self._start_node(head=True)
        return [self._start_node(f"--resources={r}") for r in worker_resources]

    def stop(self) -> None:
        for d in reversed(self.dirs):
            kill_tree(d, grace=0)
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- the test

def test_embed_survives_a_worker_node_dying(tmp_path, tiny_teacher, orl_listing):
    secret = "pw-" + secrets.token_hex(8)
    token = tmp_path / "ray_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
               TF_CPP_MIN_LOG_LEVEL="2", REDISCLI_AUTH=secret)
    out = tmp_path / "shards"
    cluster = LocalCluster(env, tmp_path)
    driver = None
    with RedisServer(tmp_path / "redis", password=secret, appendonly=True) as rs:
        ledger_url = f"redis://127.0.0.1:{rs.port}/0"  # the password comes from REDISCLI_AUTH
        embed = [sys.executable, "-m", "distill", "embed", str(orl_listing), "--teacher", str(tiny_teacher),
                 "--out", str(out), "--shard-size", str(SHARD_SIZE), "--batch-size", "2", "--workers", "2",
                 "--worker-resource", "distill_worker=1", "--address", cluster.address,
                 "--ledger", ledger_url, "--lease-seconds", "20", "--no-progress"]
        try:
            node_a, node_b = cluster.start(['{"node_a": 2, "distill_worker": 1}', '{"node_b": 2, "distill_worker": 1}'])
            with open(tmp_path / "embed.log", "w") as f:  # a file, not a pipe nobody reads while we poll
                driver = subprocess.Popen(embed, env=env, stdout=f, stderr=subprocess.STDOUT)

            # Mid-run: a few shards are done and node B's actor is inside a shard.
            redis = rs.client()
            deadline = time.monotonic() + 150
            while True:
                keys = redis.keys("distill:*:done")
                done = redis.hlen(keys[0]) if keys else 0
                # one actor per worker node (distill_worker=1 each), B's inside a shard
                if done >= 2 and busy_on(node_b, "EmbedWorker.embed_shard") and busy_on(node_a, "EmbedWorker"):
                    break
                assert driver.poll() is None, f"embed ended before the kill:\n{(tmp_path / 'embed.log').read_text()[-3000:]}"
                assert time.monotonic() < deadline, "the actors never started on both worker nodes"
                time.sleep(0.05)
            assert kill_tree(node_b, grace=0) > 0  # node B's raylet, agents and teacher worker
            done_at_kill = redis.hlen(keys[0])

            driver.wait(timeout=180)
            log = (tmp_path / "embed.log").read_text()
            reran = driver.returncode != 0
            if reran:  # the documented recovery: rerun the same command
                rerun = subprocess.run(embed, env=env, capture_output=True, text=True, timeout=180)
                log += rerun.stdout + rerun.stderr
                assert rerun.returncode == 0, log[-4000:]
        finally:
            if driver is not None and driver.poll() is None:
                driver.kill()
                driver.wait()
            cluster.stop()

    n = -(-ROWS // SHARD_SIZE)
    assert done_at_kill < n, "the run had finished before the node died: not a mid-run test"
    assert reran or "failed (actor died)" in log, "the driver never saw node B's actor die"
    assert secret not in log
    manifest = load_manifest(str(out))
    assert manifest["complete"] and manifest["rows_done"] == ROWS
    names = sorted(p.name for p in out.iterdir() if parse_shard_name(p.name) is not None)
    assert [parse_shard_name(x) for x in names] == list(range(n))
    index = [i for x in names for i in pq.read_table(out / x, columns=["index"])["index"].to_pylist()]
    assert sorted(index) == list(range(ROWS)), "a listing row is missing or appears twice"


def test_embed_rides_through_a_redis_restart_and_a_flush_is_rebuilt(tmp_path, ray_address, tiny_teacher, orl_listing):
    """Redis SIGKILLed mid-run (append-only file): the same driver carries on. Then the driver
    dies and Redis is flushed: `distill ledger rebuild` restores the done set from the files
    and the rerun embeds only what is missing."""
    secret = "pw-" + secrets.token_hex(8)
    out = tmp_path / "shards"
    with RedisServer(tmp_path / "redis", password=secret, appendonly=True) as rs:
        embed = [sys.executable, "-m", "distill", "embed", str(orl_listing), "--teacher", str(tiny_teacher),
                 "--out", str(out), "--shard-size", str(SHARD_SIZE), "--batch-size", "2", "--workers", "2",
                 "--address", ray_address, "--ledger", rs.url, "--no-progress"]  # password in the URL this time
        redis = rs.client()

        def done() -> int:
            keys = redis.keys("distill:*:done")
            return redis.hlen(keys[0]) if keys else 0

        def wait_for(n: int, driver: subprocess.Popen) -> int:
            deadline = time.monotonic() + 150
            while (d := done()) < n:
                assert driver.poll() is None, (tmp_path / "embed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, f"stuck at {d} done shards"
                time.sleep(0.05)
            return d

        with open(tmp_path / "embed.log", "w") as f:
            driver = subprocess.Popen(embed, stdout=f, stderr=subprocess.STDOUT)
        try:
            wait_for(3, driver)
            rs.restart(kill=True)
            redis = rs.client()
            before = done()
            assert before >= 3  # nothing acknowledged was lost
            wait_for(before + 3, driver)  # the same driver goes on after the restart
            driver.send_signal(signal.SIGKILL)
            driver.wait()
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
        rs.flush()

        rebuilt = subprocess.run([sys.executable, "-m", "distill", "ledger", "rebuild", str(out), "--ledger", rs.url],
                                 capture_output=True, text=True, timeout=120)
        assert rebuilt.returncode == 0, rebuilt.stderr
        m = re.search(r"(\d+) of 50 shards done \((\d+) rows", rebuilt.stdout)
        assert m, rebuilt.stdout
        restored_shards, restored_rows = int(m.group(1)), int(m.group(2))
        assert 6 <= restored_shards < 50 and done() == restored_shards

        rerun = subprocess.run(embed, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-4000:]
        assert f"this run: {ROWS - restored_rows} rows" in rerun.stdout + rerun.stderr  # only the missing ones
        status = subprocess.run([sys.executable, "-m", "distill", "status", str(out), "--ledger", rs.url],
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        for text in (rebuilt.stdout, rebuilt.stderr, rerun.stdout, rerun.stderr, status.stdout, status.stderr,
                     (tmp_path / "embed.log").read_text(), (out / "manifest.json").read_text()):
            assert secret not in text

    names = sorted(p.name for p in out.iterdir() if parse_shard_name(p.name) is not None)
    index = [i for x in names for i in pq.read_table(out / x, columns=["index"])["index"].to_pylist()]
    assert sorted(index) == list(range(ROWS)), "a listing row is missing or appears twice"
    assert load_manifest(str(out))["complete"]
