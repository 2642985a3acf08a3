"""`distill train` as a real process: SIGKILL mid-epoch and resume at the exact sample;
refusal of an incompatible rerun; SIGTERM and `--resume`; a user error inside Ray Train's
workers. (SIGTERM under Ray Train and a resume with another worker count: test_object_store,
with OUT on the store.)"""

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
from conftest import run_cli
from support import own_lines, write_tiny_bin
from toy_shards import write_toy_shards

from distill.shards.reader import open_shards
from distill.train.order import plan_epoch

pytestmark = pytest.mark.integration

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
BATCH, BUFFER, SEED = 32, 128, 3
# A heartbeat line of `distill train` (distill.heartbeat.train_line); 20 steps of 16 of the 400 ORL rows.
HEARTBEAT = re.compile(r"train: step \d+/25 \(\d+\.\d%\), epoch 1/1 at sample \d+, [\d,]+ img/s, loss \d\.\d{4}, "
                       r"distill \d\.\d{4}, pair \d\.\d{4}, cos -?\d\.\d{4}, lr \S+, ETA (\d+[smhd])+$")


def distill(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def jsonl(path: Path, partial_ok: bool = False) -> list[dict]:
    """Records of a JSON-lines file; ``partial_ok`` skips a line still being (or never fully) written."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if not partial_ok:
                raise
    return out


def ckpt_steps(out: Path) -> list[int]:
    d = out / "checkpoints"
    return sorted(int(n.split("-")[1]) for n in os.listdir(d) if n.startswith("ckpt-")) if d.is_dir() else []


def listing_index(shard_dir: Path) -> np.ndarray:
    """Listing index of every sample id (shards laid end to end in manifest order)."""
    import pyarrow.parquet as pq

    shards = open_shards(str(shard_dir))
    return np.concatenate([pq.read_table(shard_dir / n, columns=["index"]).column("index").to_numpy() for n in shards.names])


def train_args(shards: Path, out: Path, *extra) -> list:
    return ["train", shards, "--out", out, "--epochs", 2, "--batch-size", BATCH, "--student", "mobilenetv2", "--width", 0.35,
            "--checkpoint-every", 3, "--log-every", 1, "--trace-samples", "--shuffle-buffer", BUFFER,
            "--seed", SEED, "--no-progress", *extra]


@pytest.fixture(scope="module")
def killed_and_resumed(embedded_run, tmp_path_factory):
    """Train on the real embed run, SIGKILL after a checkpoint mid-epoch, rerun to the end."""
    out = tmp_path_factory.mktemp("student") / "student"
    steps_per_epoch = sum(open_shards(str(embedded_run)).rows) // BATCH
    log = open(out.parent / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "distill", *map(str, train_args(embedded_run, out))],
                            stdout=log, stderr=subprocess.STDOUT, env=ENV)
    trace = out / "trace.jsonl"
    deadline = time.monotonic() + 600  # a guard against a hung trainer, not a speed check
    killed_at = None
    while proc.poll() is None and time.monotonic() < deadline:
        done = ckpt_steps(out)
        steps = [r["step"] for r in jsonl(trace, partial_ok=True)] if trace.exists() else []
        if done and steps and steps[-1] > done[-1] and steps[-1] % steps_per_epoch:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at = (done[-1], steps[-1])
            break
        time.sleep(0.05)
    log.close()
    if killed_at is None:
        proc.kill()
        pytest.fail("the trainer finished (or hung) before it could be killed mid-epoch:\n"
                    + (out.parent / "first.log").read_text()[-3000:])
    first_trace = jsonl(trace, partial_ok=True)
    second = distill(*train_args(embedded_run, out))
    assert second.returncode == 0, second.stderr[-3000:]
    return embedded_run, out, killed_at, first_trace, second, steps_per_epoch


def test_resume_after_sigkill_covers_every_sample_once_in_order(killed_and_resumed):
    shards, out, (ckpt_step, killed_step), first_trace, second, spe = killed_and_resumed
    assert f"resumed from {out}/checkpoints/ckpt-{ckpt_step:09d}" in second.stderr
    total = 2 * spe
    trace = {}
    for r in jsonl(out / "trace.jsonl"):
        trace[r["step"]] = r  # last occurrence of each step wins
    assert sorted(trace) == list(range(1, total + 1))
    # The steps the killed run did past its checkpoint were redone on the same samples.
    redone = [r for r in first_trace if r["step"] > ckpt_step]
    assert redone and all(trace[r["step"]]["index"] == r["index"] for r in redone)
    index_of = listing_index(shards)
    rows = open_shards(str(shards)).rows
    for epoch in range(2):
        got = [i for s in range(epoch * spe + 1, (epoch + 1) * spe + 1) for i in trace[s]["index"]]
        assert all(trace[s]["epoch"] == epoch for s in range(epoch * spe + 1, (epoch + 1) * spe + 1))
        assert len(got) == len(set(got)) == spe * BATCH  # none twice, none skipped
        plan = plan_epoch(rows, seed=SEED, epoch=epoch, world_size=1, rank=0, buffer=BUFFER, global_batch=BATCH)
        assert got == index_of[plan.order].tolist()  # and exactly the planned order
    metrics = jsonl(out / "metrics.jsonl")
    steps = [m for m in metrics if m["kind"] == "step"]
    assert [m["step"] for m in steps] == list(range(1, total + 1))  # each step once, counters continue
    assert all(m["samples"] == ((m["step"] - 1) % spe + 1) * BATCH and m["epoch"] == (m["step"] - 1) // spe for m in steps)
    assert all({"loss", "distill", "pair", "cos", "images_per_sec"} <= set(m) and not {"ce", "contrast"} & set(m)
               for m in steps)  # the default terms: nMSE and the capped relational term
    assert [(m["epoch"], m["step"]) for m in metrics if m["kind"] == "epoch"] == [(0, spe), (1, total)]
    cursor = json.loads((out / "checkpoints" / f"ckpt-{total:09d}" / "cursor.json").read_text())
    assert (cursor["epoch"], cursor["samples"], cursor["step"], cursor["global_batch"]) == (2, 0, total, BATCH)
    assert (out / "checkpoints" / f"ckpt-{total:09d}" / "config.json").exists()
    assert any(n.startswith("events") for n in os.listdir(out / "tb"))


def test_sigterm_checkpoints_the_step_it_stopped_at_and_resume_goes_on_from_there(embedded_run, tmp_path):
    """A preemption notice: the step in flight finishes, a checkpoint is written at it (none
    was due for 1000 steps), exit 143 with the resume command; `distill train --resume OUT`
    (the saved options, nothing retyped) loses no step."""
    out = tmp_path / "student"
    spe = sum(open_shards(str(embedded_run)).rows) // BATCH
    args = [*train_args(embedded_run, out)[:-1], "--checkpoint-every", 1000, "--epochs", 1, "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "distill", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    trace, deadline = out / "trace.jsonl", time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        steps = [r["step"] for r in jsonl(trace, partial_ok=True)] if trace.exists() else []
        if len(steps) >= 2 and steps[-1] % spe:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    stopped_at = ckpt_steps(out)
    assert len(stopped_at) == 1 and stopped_at[0] % spe, stopped_at  # mid-epoch, where it stopped
    assert f"stopped at step {stopped_at[0]} " in err and "rerun the same command" in err and "Traceback" not in err
    assert [r["step"] for r in jsonl(trace)] == list(range(1, stopped_at[0] + 1))

    again = distill("train", "--resume", out)  # the run's own options: nothing retyped
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"ckpt-{stopped_at[0]:09d}" in again.stderr
    # Every step exactly once over both runs (nothing redone, nothing skipped), in the planned order.
    records = jsonl(trace)
    assert [r["step"] for r in records] == list(range(1, spe + 1))
    index_of, rows = listing_index(embedded_run), open_shards(str(embedded_run)).rows
    plan = plan_epoch(rows, seed=SEED, epoch=0, world_size=1, rank=0, buffer=BUFFER, global_batch=BATCH)
    assert [i for r in records for i in r["index"]] == index_of[plan.order].tolist()


def test_incompatible_rerun_is_refused_before_training(killed_and_resumed):
    shards, out, *_ = killed_and_resumed
    before = sorted(os.listdir(out / "checkpoints"))
    other = distill(*train_args(shards, out)[:-1], "--batch-size", 16, "--no-progress")
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "--batch-size: checkpoint has 32, now 16" in other.stderr and "new --out" in other.stderr
    assert sorted(os.listdir(out / "checkpoints")) == before


def test_a_user_error_inside_a_ray_train_worker_reaches_the_cli_as_one_line(ray_address, tmp_path):
    # The driver's checks pass; the workers find no whole batch in an epoch (a BadOption they raise).
    shards = write_toy_shards(tmp_path / "shards", rows=64, shard_size=32, size=32, dim=8)
    r = distill("train", shards, "--out", tmp_path / "student", "--batch-size", 128, "--workers", 2,
                "--address", ray_address, "--student", "mobilenetv2", "--width", 0.35, "--no-progress")
    assert r.returncode == 2, r.stderr[-3000:]
    own = own_lines(r.stderr)
    assert own[-1].startswith("distill train: error: an epoch has no whole batch"), r.stderr[-3000:]
    assert not [line for line in own if "Traceback" in line], r.stderr[-3000:]


# A learning rate float32 holds as inf: step 1's update leaves weights that are not numbers.
@pytest.mark.parametrize("rows, caught", [
    # Four-step epochs: step 2's loss shows it.
    (64, r"the loss is (nan|inf) at step 2 \(epoch 1\), so the weights are no longer numbers"),
    # One-step epochs: the epoch ends (and would checkpoint) after that update, before any loss shows it.
    (16, r"\d+ of the weights at step 1 are not numbers \(e\.g\. (model|optimizer)/[^)]+\)"),
])
def test_weights_that_stop_being_numbers_end_the_run_in_one_line_and_nothing_after_them_is_saved(tmp_path, rows, caught):
    shards = write_toy_shards(tmp_path / "shards", rows=rows, shard_size=32, size=32, dim=8)
    out = tmp_path / "student"
    r = distill("train", shards, "--out", out, "--batch-size", 16, "--student", "mobilenetv2", "--width", 0.35,
                "--lr", 1e39, "--warmup-steps", 0, "--epochs", 2, "--checkpoint-every", 1000, "--no-progress")
    assert r.returncode == 2, r.stderr[-3000:]
    own = own_lines(r.stderr)
    assert re.match(rf"distill train: error: training diverged: {caught}; nothing after the start was saved", own[-1]), \
        r.stderr[-3000:]
    assert not [line for line in own if "Traceback" in line] and ckpt_steps(out) == []


def test_refuses_shards_without_images(tmp_path):
    shards = write_toy_shards(tmp_path / "shards", rows=32, images=False)
    r = distill("train", shards, "--out", tmp_path / "student")
    assert r.returncode == 2 and "no images" in r.stderr and "Traceback" not in r.stderr


def test_verification_sets_every_n_steps_and_at_the_epoch_end_choose_the_best(embedded_run, tmp_path):
    """--val-bin: insightface's 10-fold figures every --val-every steps and at the epoch end, in
    metrics.jsonl and TensorBoard; OUT/best by the named set. (Resuming a run that validates:
    test_glint_views.)"""
    tiny = write_tiny_bin(tmp_path / "orlpairs.bin")
    out = tmp_path / "student"
    args = ("train", embedded_run, "--out", out, "--student", "mobilenetv2", "--width", "0.35", "--batch-size", "16",
            "--epochs", "1", "--val-bin", tiny, "--val-every", "10", "--no-progress", "--no-verify-shards", "--ema", "0.9")
    r = run_cli(*args, "--heartbeat", "0.1")  # one epoch: 25 steps of 16 over 400 rows
    # --ema over a run this short: the average would still hold the first step's weights, and the log says so.
    assert "--ema 0.9 over 25 steps: the first step's weights still make up 7% of the average" in r.stderr
    assert "validating at every epoch end and every 10 steps on orlpairs (20 pairs); OUT/best by val_orlpairs_acc" in r.stderr
    # Off a terminal the bars are off: the heartbeat says where the run is (here every 0.1 s, at most once a step).
    beats = [line for line in r.stderr.splitlines() if " INFO distill.train.loop: train: step " in line]
    assert beats and all(HEARTBEAT.search(line) for line in beats), r.stderr[-3000:]
    assert len({line.split("train: step ")[1].split("/")[0] for line in beats}) == len(beats)  # once a step at most
    assert r.stderr.count("hold no teacher views") == 1 and "views help on faces unlike the training faces" in r.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [rec for rec in records if rec["kind"] == "val"]
    assert [v["step"] for v in vals] == [0, 10, 20]  # the start, then every 10 steps
    for v in vals:  # 10 folds of 2 pairs: accuracy in 20ths; AUC over 10 same x 10 different pairs: in 200ths (ties half)
        acc, auc = v["val_orlpairs_acc"] * 20, v["val_orlpairs_auc"] * 200
        assert abs(acc - round(acc)) < 1e-6 and 0 <= round(acc) <= 20, v
        assert abs(auc - round(auc)) < 1e-6 and 0 <= round(auc) <= 200, v
    epoch = [rec for rec in records if rec["kind"] == "epoch"]
    assert len(epoch) == 1 and epoch[0]["step"] == 25 and "val_orlpairs_acc" in epoch[0]
    best = json.loads((out / "best" / "val.json").read_text())
    assert best["val_orlpairs_acc"] == max(v["val_orlpairs_acc"] for v in vals[1:] + epoch)
    assert list((out / "tb").iterdir())
    # The averages ride in every checkpoint (optimizer state); OUT/best holds the model alone.
    with np.load(out / "checkpoints" / f"ckpt-{25:09d}" / "state.npz") as z:
        assert any(k.startswith("optimizer/") and k.endswith("_average") for k in z.files)
    with np.load(out / "best" / "state.npz") as z:
        assert z.files and all(k.startswith("model/") for k in z.files)
