"""The pipeline with every output on an object store: a real S3 API server on loopback
(moto_server, tests/s3_server.py), the real CLI as processes, SIGKILL mid-run and a rerun.

Nothing reaches a local ``./s3:`` folder; the only local files are the caches under
``$DISTILL_CACHE``. The shards written to the store are byte for byte the ones a local run
writes, and a training run killed mid-epoch against s3:// goes on to train every sample once,
in the order an uninterrupted run takes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ORL, run_cli
from redis_server import RedisServer
from s3_server import S3Server
from support import orl_jpegs, own_lines
from toy_shards import write_toy_shards

from distill.mirror import MARKER
from distill.shards.reader import ShardReader, open_shards
from distill.train.order import plan_epoch

pytestmark = pytest.mark.integration

BUCKET = "distill-it"
BATCH, BUFFER, SEED = 32, 128, 3


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        server.make_bucket(BUCKET)
        yield server


@pytest.fixture(scope="module")
def store_env(s3, tmp_path_factory) -> dict[str, str]:
    return {**s3.env, "DISTILL_CACHE": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as rs:
        yield rs.url


@pytest.fixture(scope="module")
def s3_shards(s3, store_env, ledger, ray_address, tiny_teacher, orl_listing) -> str:
    """The ORL faces embedded straight into the bucket (the ledger in Redis, as on a cluster)."""
    uri = f"s3://{BUCKET}/run/shards"
    run_cli("embed", orl_listing, "--teacher", tiny_teacher, "--out", uri, "--ledger", ledger,
            "--shard-size", "64", "--batch-size", "32", "--address", ray_address, "--no-progress", env=store_env)
    return uri


def test_embed_writes_the_same_shard_bytes_to_the_store_as_to_a_local_disk(s3, s3_shards, ledger, embedded_run,
                                                                           store_env):
    keys = s3.keys(BUCKET, "run/shards/")
    local = sorted(n for n in os.listdir(embedded_run) if n.endswith(".parquet"))
    assert local and sorted(k.rsplit("/", 1)[1] for k in keys if k.endswith(".parquet")) == local
    for name in local:
        assert s3.get(BUCKET, f"run/shards/{name}") == (embedded_run / name).read_bytes(), name
    status = run_cli("status", s3_shards, "--ledger", ledger, env=store_env)
    assert f"shards: {len(local)} done, 0 leased, 0 pending of {len(local)}  [complete]" in status.stdout, status.stdout


def test_a_train_rec_on_the_store_is_listed_and_embedded_by_byte_ranges_to_the_bytes_of_a_local_pack(
        s3, store_env, ledger, ray_address, tiny_teacher, tmp_path):
    """insightface's train.rec / train.idx / property and the teacher in the bucket: `distill
    listing` reads the index and the header records in place, the teacher actors fetch the
    teacher and read each image record by a ranged GET, and the shards equal those of the same
    pack and teacher listed and embedded from a disk."""
    import pyarrow.parquet as pq

    from distill.embed.recordio import write_insightface_rec

    pack = tmp_path / "pack"
    write_insightface_rec(str(pack), orl_jpegs(people=4, per_person=8))
    for name in ("train.rec", "train.idx", "property"):
        s3.client().put_object(Bucket=BUCKET, Key=f"emore/{name}", Body=(pack / name).read_bytes())
    run_cli("listing", f"s3://{BUCKET}/emore", "--out", tmp_path / "s3-listing.parquet", env=store_env)
    run_cli("listing", pack, "--out", tmp_path / "local-listing.parquet")
    on_store = pq.read_table(tmp_path / "s3-listing.parquet")
    local = pq.read_table(tmp_path / "local-listing.parquet")
    assert on_store.num_rows == local.num_rows == 32
    for column in ("index", "label", "offset"):
        assert on_store.column(column).equals(local.column(column)), column
    # The teacher in the bucket too: each actor fetches it into its node's cache.
    for f in Path(tiny_teacher).rglob("*"):
        if f.is_file():
            s3.client().put_object(Bucket=BUCKET, Key=f"teachers/tiny/{f.relative_to(tiny_teacher)}", Body=f.read_bytes())
    common = ("--shard-size", "8", "--batch-size", "8", "--address", ray_address, "--no-progress")
    run_cli("embed", tmp_path / "s3-listing.parquet", "--teacher", f"s3://{BUCKET}/teachers/tiny", "--out",
            f"s3://{BUCKET}/emore-shards", "--ledger", ledger, *common, env=store_env)
    run_cli("embed", tmp_path / "local-listing.parquet", "--teacher", tiny_teacher, "--out", tmp_path / "shards",
            *common)
    names = sorted(n for n in os.listdir(tmp_path / "shards") if n.endswith(".parquet"))
    assert len(names) == 4
    for name in names:
        assert s3.get(BUCKET, f"emore-shards/{name}") == (tmp_path / "shards" / name).read_bytes(), name


@pytest.fixture(scope="module")
def orl_on_store(s3, store_env) -> str:
    """The ORL faces uploaded as they are (one folder per person), and listed where they are:
    the listing itself written to the store."""
    for f in sorted(Path(ORL).rglob("*.pgm")):
        s3.client().put_object(Bucket=BUCKET, Key=f"orl/{f.relative_to(ORL).as_posix()}", Body=f.read_bytes())
    listing = f"s3://{BUCKET}/lists/orl.parquet"
    run_cli("listing", f"s3://{BUCKET}/orl", "--out", listing, env=store_env)
    return listing


def _table(path_or_bytes):
    import io

    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes)


def _columns_but_path(table) -> dict:
    return {name: table.column(name) for name in table.column_names if name != "path"}


def test_image_folders_on_the_store_are_listed_and_embedded_to_the_floats_of_the_same_faces_on_disk(
        s3, orl_on_store, store_env, ledger, ray_address, tiny_teacher, embedded_run):
    """A folder tree of images in the bucket (no pack): the listing lists its keys and is
    itself an object, the driver reads its copy, the actors read every image by its URI."""
    run_cli("embed", orl_on_store, "--teacher", tiny_teacher, "--out", f"s3://{BUCKET}/orl-shards", "--ledger",
            ledger, "--shard-size", "64", "--batch-size", "32", "--address", ray_address, "--no-progress",
            env=store_env)
    names = sorted(n for n in os.listdir(embedded_run) if n.endswith(".parquet"))
    assert len(names) == 7
    for name in names:
        got = _table(s3.get(BUCKET, f"orl-shards/{name}"))
        assert _columns_but_path(got) == _columns_but_path(_table(embedded_run / name)), name
        assert all(p.startswith(f"s3://{BUCKET}/orl/s") for p in got.column("path").to_pylist())
    manifest = json.loads(s3.get(BUCKET, "orl-shards/manifest.json"))
    assert manifest["listing"] == orl_on_store
    assert not list(Path(".").glob("s3:*"))


def test_a_pass_killed_and_then_cut_off_from_the_store_resumes_to_the_bytes_of_an_uninterrupted_one(
        s3, orl_on_store, store_env, ledger, ray_address, tiny_teacher):
    """Against the store, images read from it and shards written to it: the driver is killed
    (SIGKILL) once a shard is there; the rerun goes on, and while it runs the store stops
    answering (every connection reset, new ones refused) for 4 s, then comes back with its
    contents. The calls are retried, the pass finishes, and its shards are byte for byte those
    of the pass nothing interrupted."""
    from s3_server import Outage

    out = f"s3://{BUCKET}/outage-shards"
    # (short leases: the killed driver's are taken over in seconds)
    common = ("--teacher", tiny_teacher, "--ledger", ledger, "--shard-size", "64", "--batch-size", "32",
              "--lease-seconds", "5", "--address", ray_address, "--no-progress")

    def shards_there() -> int:
        return sum(k.endswith(".parquet") for k in s3.keys(BUCKET, "outage-shards/"))

    def start(env) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "distill", "embed", orl_on_store, "--out", out, *common],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def wait_for(proc, n: int) -> None:
        deadline = time.monotonic() + 300
        while shards_there() < n:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)

    started = []  # (killed if the test fails: a pass left running would hold the session's Ray CPUs)
    try:
        with Outage(s3) as relay:
            env = {**os.environ, **store_env, **relay.env}
            first = start(env)
            started.append(first)
            wait_for(first, 1)
            first.send_signal(signal.SIGKILL)
            first.wait()
            killed_at = shards_there()
            second = start(env)
            started.append(second)
            wait_for(second, killed_at + 1)
            relay.down()
            cut_at = shards_there()
            deadline = time.monotonic() + 300  # down until the pass has tried the store and been cut off
            while relay.refused < 2 and second.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert relay.refused >= 2, "the pass never reached for the store while it was down"
            relay.up()
            _, err = second.communicate(timeout=600)
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert second.returncode == 0, err[-3000:]
    assert killed_at < 7 and cut_at < 7, "the pass finished before it was interrupted: nothing was tested"
    names = sorted(k.rsplit("/", 1)[1] for k in s3.keys(BUCKET, "orl-shards/") if k.endswith(".parquet"))
    if not names:  # (this test run alone: the uninterrupted pass to compare with)
        run_cli("embed", orl_on_store, "--out", f"s3://{BUCKET}/orl-shards", *common, env=store_env)
        names = sorted(k.rsplit("/", 1)[1] for k in s3.keys(BUCKET, "orl-shards/") if k.endswith(".parquet"))
    got = sorted(k.rsplit("/", 1)[1] for k in s3.keys(BUCKET, "outage-shards/") if k.endswith(".parquet"))
    assert got == names and len(names) == 7
    for name in names:
        assert s3.get(BUCKET, f"outage-shards/{name}") == s3.get(BUCKET, f"orl-shards/{name}"), name
    status = run_cli("status", out, "--ledger", ledger, "--verify", env=store_env)
    assert "shards: 7 done, 0 leased, 0 pending of 7  [complete]" in status.stdout, status.stdout


def _trace(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out


def test_training_killed_mid_epoch_against_the_store_resumes_to_the_uninterrupted_order(
        s3, s3_shards, store_env, tmp_path, monkeypatch):
    out = f"s3://{BUCKET}/run/student"
    args = [sys.executable, "-m", "distill", "train", s3_shards, "--out", out, "--epochs", "2", "--batch-size",
            str(BATCH), "--student", "mobilenetv2", "--width", "0.35", "--checkpoint-every", "3", "--log-every", "1",
            "--trace-samples", "--shuffle-buffer", str(BUFFER), "--seed", str(SEED), "--no-progress"]
    env = {**os.environ, **store_env}
    for k, v in store_env.items():
        monkeypatch.setenv(k, v)
    shards = open_shards(s3_shards)
    spe = sum(shards.rows) // BATCH
    local_copy = Path(store_env["DISTILL_CACHE"], "remote", "s3", BUCKET, "run", "student", ".copy")
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    deadline, killed = time.monotonic() + 600, None
    while proc.poll() is None and time.monotonic() < deadline:
        published = sorted(int(k.split("ckpt-")[1][:9]) for k in s3.keys(BUCKET, "run/student/checkpoints/")
                           if k.endswith(MARKER))
        steps = [r["step"] for r in _trace(local_copy / "trace.jsonl")]
        if published and steps and steps[-1] > published[-1] and steps[-1] % spe:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = published[-1]
            break
        time.sleep(0.05)
    log.close()
    if killed is None:
        proc.kill()
        pytest.fail("the trainer finished (or hung) before it could be killed mid-epoch:\n"
                    + (tmp_path / "first.log").read_text()[-3000:])
    second = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {local_copy}/checkpoints/ckpt-{killed:09d}" in second.stderr
    assert f"checkpoint: {out}/checkpoints/ckpt-{2 * spe:09d}" in second.stdout
    assert not (tmp_path / "s3:").exists()
    # The store holds the finished run: its last checkpoint whole, the logs of every step once.
    keys = s3.keys(BUCKET, "run/student/")
    assert f"run/student/checkpoints/ckpt-{2 * spe:09d}/{MARKER}" in keys
    metrics = [json.loads(line) for line in s3.get(BUCKET, "run/student/metrics.jsonl").decode().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "step"] == list(range(1, 2 * spe + 1))
    trace = {}
    for line in s3.get(BUCKET, "run/student/trace.jsonl").decode().splitlines():
        r = json.loads(line)
        trace[r["step"]] = r
    assert sorted(trace) == list(range(1, 2 * spe + 1))
    index_of = ShardReader(shards).read_rows(np.arange(sum(shards.rows)), ["index"]).column("index").to_numpy()
    for epoch in range(2):
        got = [i for s in range(epoch * spe + 1, (epoch + 1) * spe + 1) for i in trace[s]["index"]]
        plan = plan_epoch(shards.rows, seed=SEED, epoch=epoch, world_size=1, rank=0, buffer=BUFFER, global_batch=BATCH)
        assert got == index_of[plan.order].tolist()  # every sample once, in the uninterrupted order
    # Export from the store to the store, and evaluate the export there, results to the store.
    run_cli("export", out, "--out", f"s3://{BUCKET}/run/export", env=env)
    assert f"run/export/{MARKER}" in s3.keys(BUCKET, "run/export/")
    assert "run/export/saved_model/saved_model.pb" in s3.keys(BUCKET, "run/export/")
    run_cli("evaluate", f"s3://{BUCKET}/run/export", "--folders", ORL, "--out", f"s3://{BUCKET}/run/eval.json",
            env=env)
    result = json.loads(s3.get(BUCKET, "run/eval.json"))["targets"][0]
    assert result["dataset"]["images"] == 400  # ORL whole: every distinct pair of its 40 people x 10 images scored
    assert (result["dataset"]["pairs"], result["dataset"]["same_pairs"]) == (400 * 399 // 2, 40 * 10 * 9 // 2)
    assert np.isfinite(result["models"]["model"]["auc"])


def test_ray_train_workers_stop_through_the_store_and_one_process_goes_on_from_there(
        s3, store_env, ray_address, tmp_path):
    """Graceful stop under Ray Train, then elastic resume, with OUT on the store: the driver's
    SIGTERM reaches the two workers as an object there, they agree on a step, checkpoint it
    (Ray Train's, under OUT/ray on the store, adopted into OUT/checkpoints) and end; exit 143.
    One process then goes on from that checkpoint at exactly the next sample: every step is
    trained once across the two runs, in the order one process plans, and the toy task is
    learnt across both. (OUT on a local disk takes the same path through ``distill.storage``;
    its STOP file and checkpoint adoption are unit-tested in test_stopping and test_train_decisions.)"""
    shards = write_toy_shards(tmp_path / "shards", rows=128, shard_size=32, classes=4, size=32, dim=8)
    out = f"s3://{BUCKET}/ray-run/student"
    # The recipe is spelled out: this is about the workers, not about the default recipe.
    args = [sys.executable, "-m", "distill", "train", str(shards), "--out", out, "--epochs", "4", "--batch-size", "16",
            "--student", "mobilenetv2", "--width", "0.35", "--lr", "3e-3", "--lr-schedule", "constant",
            "--warmup-steps", "0", "--distill-loss", "mse", "--ce-weight", "1", "--log-every", "1",
            "--checkpoint-every", "100", "--shuffle-buffer", "64", "--trace-samples", "--no-progress"]
    env = {**os.environ, **store_env}
    rank0 = Path(store_env["DISTILL_CACHE"], "remote", "s3", BUCKET, "ray-run", "student", ".copy-rank-0")
    first = subprocess.Popen([*args, "--workers", "2", "--address", ray_address, "--heartbeat", "0.2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 600
    while len(_trace(rank0 / "trace.jsonl")) < 3:
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 143, err[-3000:]
    # The driver's own lines end with how to resume and hold no traceback (Ray forwards its actors'
    # logs too; its placement-group cleaner sometimes logs one while the run shuts down: Ray's, not ours).
    own = own_lines(err)
    assert "on every worker, with a checkpoint; rerun the same command" in own[-1], err[-3000:]
    assert not [line for line in own if "Traceback" in line], err[-3000:]
    # The heartbeat comes from rank 0 alone, forwarded to the driver's log by Ray (in Ray Train's format).
    beats = [line for line in err.splitlines()
             if re.search(r"\(RayTrainWorker pid=\d+[^)]*\)(\x1b\[[0-9;]*m)? train: step \d+/32 ", line)]
    assert beats and len({line.split(")")[0] for line in beats}) == 1, err[-3000:]
    keys = s3.keys(BUCKET, "ray-run/student/")
    assert "STOP" not in {k.rsplit("/", 1)[1] for k in keys}  # the request is cleared: the rerun is not stopped by it
    stopped = max(int(k.split("ckpt-")[1][:9]) for k in keys if "/checkpoints/ckpt-" in k and k.endswith(MARKER))
    assert 3 <= stopped < 32
    assert any("/ray/" in k and k.endswith("state.npz") for k in keys)  # Ray Train's own, on the store
    second = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"epoch {stopped // 8}, sample {(stopped % 8) * 16}, step {stopped}" in second.stderr, second.stderr[-3000:]
    metrics = [json.loads(line) for line in s3.get(BUCKET, "ray-run/student/metrics.jsonl").decode().splitlines()]
    assert [m["epoch"] for m in metrics if m["kind"] == "epoch"] == [0, 1, 2, 3]
    losses = [m["loss"] for m in metrics if m["kind"] == "step"]
    assert len(losses) == 32 and np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses  # learnt, across both runs
    trace = [json.loads(line) for line in s3.get(BUCKET, "ray-run/student/trace.jsonl").decode().splitlines()]
    assert [t["step"] for t in trace] == list(range(1, 33))  # each step once, across the two runs
    index_of = ShardReader(open_shards(str(shards))).read_rows(np.arange(128), ["index"]).column("index").to_numpy()
    for epoch in range(4):
        # Both workers' halves of every global batch were trained on, and each global batch is
        # the one a single process plans: 8 steps x 16 distinct rows per epoch.
        got = [sorted(t["index"]) for t in trace if t["epoch"] == epoch]
        plan = plan_epoch([32] * 4, seed=0, epoch=epoch, world_size=1, rank=0, buffer=64, global_batch=16)
        assert got == [sorted(b) for b in index_of[plan.order].reshape(8, 16).tolist()], epoch
        assert len({i for b in got for i in b}) == 128
    cursor = json.loads(s3.get(BUCKET, "ray-run/student/checkpoints/ckpt-000000032/cursor.json"))
    assert (cursor["world_size"], cursor["step"], cursor["epoch"]) == (1, 32, 4)
    assert not (tmp_path / "s3:").exists()


def test_outputs_on_the_store_follow_the_local_rule(s3, store_env, monkeypatch):
    """An output prefix holding another's objects is refused before any work, and they stay."""
    from distill.errors import BadOption
    from distill.outputs import EVALUATION, EXPORT, STUDENT, check_output

    for k, v in store_env.items():
        monkeypatch.setenv(k, v)
    put = s3.client().put_object
    put(Bucket=BUCKET, Key="users/mine/thesis.tex", Body=b"years of work")
    put(Bucket=BUCKET, Key="users/export/export.json", Body=b"{}")
    put(Bucket=BUCKET, Key="users/export/saved_model/saved_model.pb", Body=b"x")
    put(Bucket=BUCKET, Key="users/notes.json", Body=b'{"mine": 1}')
    before = s3.keys(BUCKET, "users/")
    assert check_output(f"s3://{BUCKET}/users/new", STUDENT) == "new"
    assert check_output(f"s3://{BUCKET}/users/export", EXPORT) == "ours"
    with pytest.raises(BadOption, match=r"users/mine is not empty and is no earlier output of `distill export` "
                                        r"\(it holds thesis.tex\)"):
        check_output(f"s3://{BUCKET}/users/mine", EXPORT)
    with pytest.raises(BadOption, match="contains the input STUDENT"):
        check_output(f"s3://{BUCKET}/users", EXPORT, {"STUDENT": f"s3://{BUCKET}/users/student"})
    with pytest.raises(BadOption, match="not a results file distill wrote"):
        check_output(f"s3://{BUCKET}/users/notes.json", EVALUATION)
    assert s3.keys(BUCKET, "users/") == before
