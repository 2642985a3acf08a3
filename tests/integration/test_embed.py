"""The teacher pass end to end: real CLI processes on the session Ray cluster.

Resume tests kill real processes with SIGKILL and compare shard bytes with an
uninterrupted run of the same command.
"""

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
import psutil
import pyarrow.parquet as pq
import pytest
from conftest import MOBILEFACENET, ORL, run_cli
from support import CHILD_ENV, command_lines, orl_jpegs, process_tree

pytestmark = pytest.mark.integration


def read_all(shard_dir: Path):
    tables = [pq.read_table(p) for p in sorted(shard_dir.glob("part-*.parquet"))]
    return tables


def shard_bytes(shard_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(shard_dir.glob("part-*.parquet"))}


# The subset runs compared byte for byte. --cpus-per-worker is the teacher's thread count, which
# changes its floats on some CPUs (oneDNN's blocking), so every run that is compared fixes it.
SUBSET_ARGS = ("--shard-size", "8", "--batch-size", "4", "--cpus-per-worker", "2")


def embed_args(listing, teacher, out, address, *extra):
    return ["embed", listing, "--teacher", teacher, "--out", out, "--address", address, "--no-progress", *extra]


def test_tiny_teacher_over_orl(embedded_run, tiny_teacher, orl_listing, tmp_path):
    from distill.images import decode_rgb
    from distill.teacher import Preprocessing, Teacher, inspect_teacher

    manifest = json.loads((embedded_run / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows_done"] == 400 and manifest["num_shards"] == 7
    assert manifest["num_classes"] == 40 and manifest["embedding_dim"] == 32 and manifest["error_count"] == 0
    tables = read_all(embedded_run)
    assert len(tables) == 7
    index = np.concatenate([t.column("index").to_numpy() for t in tables])
    assert sorted(index) == list(range(400))  # every row exactly once
    # Each shard holds its planned rows, and the manifest's checksums match the files.
    for s in manifest["shards"]:
        t = pq.read_table(embedded_run / s["name"])
        assert t.column("index").to_pylist() == list(range(s["start"], s["stop"]))
    # The stored embeddings are the teacher's output on the stored (preprocessed-identically) images.
    t = tables[3]
    teacher = Teacher(inspect_teacher(str(tiny_teacher)), Preprocessing())
    px = np.stack([decode_rgb(b) for b in t.column("image").to_pylist()])
    emb = np.asarray(t.column("embedding").to_pylist(), np.float32)
    flip = np.asarray(t.column("embedding_flip").to_pylist(), np.float32)
    np.testing.assert_allclose(emb, teacher(px), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(flip, teacher(px[:, :, ::-1]), rtol=1e-4, atol=1e-5)
    assert not np.allclose(emb, flip)
    # Plain Parquet: pandas reads it with no Ray types.
    df = pq.read_table(embedded_run / "part-00000.parquet").to_pandas()
    assert list(df.columns) == ["index", "label", "path", "embedding", "embedding_flip", "image"]
    assert df["path"].iloc[0].endswith(".pgm")

    # A finished run reruns in seconds without teacher work; status and export-npy read it.
    out = run_cli(*embed_args(orl_listing, tiny_teacher, embedded_run, "127.0.0.1:1",  # no Ray needed
                              "--shard-size", "64", "--batch-size", "32"))
    assert "this run: 0 rows" in out.stdout
    st = run_cli("status", embedded_run)
    assert "7 done, 0 leased, 0 pending of 7" in st.stdout and "[complete]" in st.stdout
    run_cli("export-npy", embedded_run, "--out", tmp_path / "npy")
    e0 = np.load(tmp_path / "npy" / "0_emb.npy")
    assert e0.shape == (64, 32) and e0.dtype == np.float32
    assert len((tmp_path / "npy" / "6_img.foo").read_text().splitlines()) == 400 - 6 * 64


def test_another_teacher_or_preprocessing_is_refused(embedded_run, orl_listing, tiny_teacher, ray_address):
    before = shard_bytes(embedded_run)
    r = run_cli(*embed_args(orl_listing, tiny_teacher, embedded_run, ray_address, "--shard-size", "64",
                            "--batch-size", "32", "--channel-order", "BGR"), check=False)
    assert r.returncode == 2 and "another run" in r.stderr and "channel_order" in r.stderr
    r = run_cli(*embed_args(orl_listing, MOBILEFACENET, embedded_run, ray_address, "--shard-size", "64",
                            "--batch-size", "32"), check=False)
    assert r.returncode == 2 and "teacher_fingerprint" in r.stderr
    assert shard_bytes(embedded_run) == before


@pytest.fixture(scope="module")
def subset_listing(tmp_path_factory) -> Path:
    """12 ORL identities (120 images) as a list file: the real teacher takes a few seconds."""
    d = tmp_path_factory.mktemp("subset")
    lines = [f"{ORL / f's{p}' / f'{i}.pgm'}\t{p - 1}" for p in range(1, 13) for i in range(1, 11)]
    (d / "list.txt").write_text("\n".join(lines) + "\n")
    run_cli("listing", d / "list.txt", "--out", d / "listing.parquet")
    return d / "listing.parquet"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, subset_listing, ray_address) -> Path:
    """An uninterrupted run with the real teacher: the bytes every resumed run must equal."""
    out = tmp_path_factory.mktemp("ref") / "shards"
    run_cli(*embed_args(subset_listing, MOBILEFACENET, out, ray_address, *SUBSET_ARGS))
    return out


def test_real_teacher_separates_identities(reference_run):
    tables = read_all(reference_run)
    label = np.concatenate([t.column("label").to_numpy() for t in tables])
    emb = np.concatenate([np.asarray(t.column("embedding").to_pylist(), np.float32) for t in tables])
    assert emb.shape == (120, 192)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = e @ e.T
    same = label[:, None] == label[None, :]
    off_diag = ~np.eye(len(label), dtype=bool)
    assert cos[same & off_diag].mean() > cos[~same].mean() + 0.2


def _start(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distill", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_shards(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        have = len(list(out.glob("part-*.parquet"))) if out.exists() else 0
        if have >= n:
            return have
        if proc.poll() is not None:
            raise AssertionError(f"embed exited {proc.returncode} before {n} shards:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} shards after {timeout}s")


def test_sigkill_driver_midway_then_rerun_is_byte_identical(tmp_path, subset_listing, reference_run, ray_address):
    out = tmp_path / "shards"
    args = embed_args(subset_listing, MOBILEFACENET, out, ray_address, *SUBSET_ARGS)
    proc = _start(args)
    have = _wait_for_shards(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert have < 15, "the run finished before it could be killed; make it slower"
    partial = shard_bytes(out)
    r = run_cli(*args)
    assert "embed complete" in r.stdout
    resumed = shard_bytes(out)
    assert resumed == shard_bytes(reference_run)
    assert all(resumed[name] == data for name, data in partial.items())  # done shards not rewritten
    assert (out / "manifest.json").read_bytes() == (reference_run / "manifest.json").read_bytes()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def _actor_pids(ray_head) -> list[int]:
    """The teacher actors of this session's Ray head (never another cluster's on this machine)."""
    cmds = command_lines()
    return [p for p in process_tree(ray_head.temp) if cmds.get(p, "").startswith("ray::EmbedWorker")]


def test_sigkill_actor_midshard_then_run_finishes_byte_identical(tmp_path, subset_listing, reference_run, ray_head,
                                                                ray_address):
    out = tmp_path / "shards"
    args = embed_args(subset_listing, MOBILEFACENET, out, ray_address, *SUBSET_ARGS)
    proc = _start(args)
    _wait_for_shards(out, 2, proc)
    pids = _actor_pids(ray_head)
    assert pids, "no teacher actor process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "actor died" in stderr
    assert shard_bytes(out) == shard_bytes(reference_run)


def test_two_drivers_at_once_share_the_work_exactly_once(tmp_path, subset_listing, reference_run, ray_address):
    out = tmp_path / "shards"
    args = embed_args(subset_listing, MOBILEFACENET, out, ray_address, *SUBSET_ARGS)
    a, b = _start(args), _start(args)  # (2 CPUs per actor: both drivers' actors fit on the 4-CPU session head)
    for p in (a, b):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert shard_bytes(out) == shard_bytes(reference_run)
    index = np.concatenate([t.column("index").to_numpy() for t in read_all(out)])
    assert sorted(index) == list(range(120))


def test_sigterm_stops_cleanly_and_the_rerun_is_byte_identical(tmp_path, subset_listing, reference_run, ray_address):
    """No abort trace: nothing new leased, the shards in flight finish, leases released, the
    manifest of what is done written, exit 143 with the resume command."""
    out = tmp_path / "shards"
    args = embed_args(subset_listing, MOBILEFACENET, out, ray_address, *SUBSET_ARGS)
    proc = _start(args)
    _wait_for_shards(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "rerun the same command to resume" in err
    assert "*** SIGTERM received" not in err and "Traceback" not in err  # (Ray's own handler aborts with that)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and 2 <= len(manifest["shards"]) < 15
    from distill.shards.ledger import FileLedger

    state = FileLedger(str(out), 15).snapshot()
    assert not [k for k, lease in state.leases.items() if k not in state.done and lease.expires > time.time()]
    r = run_cli(*args)
    assert r.returncode == 0
    assert shard_bytes(out) == shard_bytes(reference_run)


def test_sigterm_during_start_up_stops_cleanly_too(tmp_path, tiny_teacher, orl_listing):
    """A preemption notice while the driver is still starting its own local Ray (ray.init's
    own handler would exit mid-start-up, leaving Ray's agent processes behind): the same clean
    stop, exit 143, saying how to resume."""
    out = tmp_path / "shards"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "distill", "embed", str(orl_listing), "--teacher", str(tiny_teacher),
                             "--out", str(out), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**env, **CHILD_ENV})
    deadline = time.monotonic() + 120  # inside ray.init: the local Ray's first processes are up, no shard yet
    while not psutil.Process(proc.pid).children() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None and not (out / "part-00000.parquet").exists()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "rerun the same command to resume" in err
    assert "*** SIGTERM received" not in err and "Traceback" not in err


def test_corrupt_and_missing_files_are_recorded_not_fatal(tmp_path, tiny_teacher, ray_address):
    src = tmp_path / "faces"
    for person in ("s1", "s2", "s3"):
        (src / person).mkdir(parents=True)
        for i in range(1, 5):
            (src / person / f"{i}.pgm").write_bytes((ORL / person / f"{i}.pgm").read_bytes())
    good = (ORL / "s1" / "5.pgm").read_bytes()
    (src / "s1" / "empty.jpg").write_bytes(b"")
    (src / "s2" / "truncated.pgm").write_bytes(good[: len(good) // 3])
    (src / "s3" / "notes.jpg").write_text("this is not an image")
    lst = tmp_path / "list.txt"
    lines = [f"{p}\t{ord(p.parent.name[-1]) - ord('1')}" for p in sorted(src.rglob("*")) if p.is_file()]
    lines.append(f"{src / 's3' / 'deleted.pgm'}\t2")
    lst.write_text("\n".join(lines) + "\n")
    run_cli("listing", lst, "--out", tmp_path / "listing.parquet")
    out = tmp_path / "shards"
    r = run_cli(*embed_args(tmp_path / "listing.parquet", tiny_teacher, out, ray_address, "--shard-size", "5"))
    assert "4 unreadable rows recorded" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows_done"] == 12 and manifest["error_count"] == 4
    reasons = {Path(e["path"]).name: e["reason"] for e in manifest["errors"]}
    assert reasons["empty.jpg"] == "empty file" and reasons["deleted.pgm"] == "missing file"
    assert "truncated" in reasons["truncated.pgm"] or "corrupt" in reasons["truncated.pgm"]
    assert "not an image" in reasons["notes.jpg"]
    index = sorted(np.concatenate([t.column("index").to_numpy() for t in read_all(out)]).tolist())
    bad = sorted(e["index"] for e in manifest["errors"])
    assert sorted(index + bad) == list(range(16))  # every row: embedded or recorded, once
    st = run_cli("status", out, "--errors")
    assert "4 unreadable" in st.stdout and "missing file" in st.stdout


def test_a_run_of_mostly_unreadable_rows_is_not_a_silent_success(tmp_path, tiny_teacher, ray_address):
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{tmp_path / 'gone'}/{i}.jpg\t0\n" for i in range(5)) + f"{ORL / 's1' / '1.pgm'}\t0\n")
    run_cli("listing", lst, "--out", tmp_path / "listing.parquet")
    out = tmp_path / "shards"
    r = run_cli(*embed_args(tmp_path / "listing.parquet", tiny_teacher, out, ray_address), check=False)
    assert r.returncode == 1 and "5 of 6 rows (83%) were unreadable, more than --max-error-fraction 0.5" in r.stderr
    assert "missing file" in r.stderr and "Traceback" not in r.stderr
    assert json.loads((out / "manifest.json").read_text())["complete"]  # (kept: what was readable is done)
    again = run_cli(*embed_args(tmp_path / "listing.parquet", tiny_teacher, out, ray_address),
                    "--max-error-fraction", "1")
    assert again.returncode == 0


def test_rec_source_with_a_corrupt_record(tmp_path, tiny_teacher, ray_address):
    from distill.embed.recordio import write_insightface_rec

    write_insightface_rec(str(tmp_path), orl_jpegs(people=3, per_person=5))
    run_cli("listing", tmp_path / "train.rec", "--out", tmp_path / "listing.parquet")
    # Corrupt the magic of the 7th image record (key 7) in place.
    offsets = dict(line.split("\t") for line in (tmp_path / "train.idx").read_text().split("\n") if line)
    with open(tmp_path / "train.rec", "r+b") as f:
        f.seek(int(offsets["7"]))
        f.write(b"JUNK")
    out = tmp_path / "shards"
    r = run_cli(*embed_args(tmp_path / "listing.parquet", tiny_teacher, out, ray_address, "--shard-size", "4"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows_done"] == 14 and manifest["error_count"] == 1, r.stdout
    assert manifest["errors"][0]["reason"].startswith("bad record")
    t = pq.read_table(out / "part-00000.parquet")
    assert "path" not in t.column_names  # .rec rows have no paths
    assert sorted(np.concatenate([t.column("label").to_numpy() for t in read_all(out)]).tolist()) == [0] * 5 + [1] * 4 + [2] * 5


def test_a_damaged_shard_is_found_refused_by_train_and_re_embedded(tmp_path, embedded_run, orl_listing, tiny_teacher,
                                                                   ray_address):
    """64 bytes zeroed in the middle of a finished shard (bit rot, a bad copy): status --verify
    names it, train refuses it in one line, embed --verify re-embeds it to the original bytes."""
    import shutil

    out = tmp_path / "shards"
    shutil.copytree(embedded_run, out)
    victim = out / "part-00002.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    victim.write_bytes(bytes(data))

    status = run_cli("status", out, "--verify", check=False)
    assert status.returncode == 1 and "part-00002.parquet: sha256 differs from the record" in status.stdout
    train = run_cli("train", out, "--out", tmp_path / "student", "--max-steps", "1", "--no-progress", check=False)
    assert train.returncode == 2 and "Traceback" not in train.stderr
    assert "part-00002.parquet: sha256 differs from the record" in train.stderr and "--verify" in train.stderr
    assert not (tmp_path / "student" / "checkpoints").exists()

    r = run_cli("embed", orl_listing, "--teacher", tiny_teacher, "--out", out, "--shard-size", "64",
                "--batch-size", "32", "--address", ray_address, "--no-progress", "--verify", "--heartbeat", "0.1")
    assert "part-00002.parquet does not match its record" in r.stderr
    # No bar off a terminal: the heartbeat says how far the pass is (the 6 good shards' 5 x 64 + 16 rows at least).
    beats = re.findall(r"INFO distill\.embed\.sharded: embed: ([67])/7 shards done, (\d+)/400 rows \(\d+\.\d%\), [\d,]+ img/s, "
                       r"ETA \S+$", r.stderr, re.M)
    assert beats and all(int(rows) >= 336 for _, rows in beats), r.stderr[-3000:]
    assert shard_bytes(out) == shard_bytes(embedded_run)
    assert run_cli("status", out, "--verify").returncode == 0
