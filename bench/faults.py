"""A fault campaign: seeded random kills of the teacher pass and of training, each checked.

Every trial draws its kill moment from ``--seed`` and its number, runs the real CLI in real
processes on one private Ray head, kills what its kind says, reruns the same command until it
says complete, and checks the result against an uninterrupted reference run:

- the teacher pass: every listing row in exactly one shard, and every shard file and the
  manifest byte-identical to the reference; what the rerun redid (rows embedded beyond those
  missing at the kill) is recorded;
- training: every step in ``--trace-samples`` once (the last record of a redone step wins),
  each epoch's sample indices equal to the reference's as a multiset with none twice, and
  every global batch the same set of samples as the reference's; what was redone (steps
  past the last checkpoint) is recorded.

Kinds: ``embed-kill`` (driver SIGKILL), ``embed-term`` (driver SIGTERM: exit 143),
``embed-actor`` (one teacher actor SIGKILLed; the same run must finish), ``embed-two``
(two drivers at once on one output, one SIGKILLed), ``embed-redis`` (``--ledger redis://``,
redis-server SIGKILLed and restarted on its append-only file after a random pause),
``train-kill`` / ``train-term`` (one process, SIGKILL / SIGTERM at a random step) and
``train-elastic`` (SIGTERM at a random step, resumed by two Ray Train workers).
Not covered here: a worker *node* of a multi-node cluster (one machine).

    python bench/faults.py                        # 43 trials, ~25 min on 2 cores
    python bench/faults.py --trials embed-kill=2,train-kill=2 --seed 7
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/NAME.py` from anywhere

from bench.common import (  # noqa: E402
    CHILD_ENV,
    MOBILEFACENET,
    RayHead,
    add_idle_args,
    command_lines,
    distill_cmd,
    loadavg,
    make_face_jpegs,
    print_header,
    process_tree,
    run_child,
    settle,
    table,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers import each other so
from redis_server import RedisServer  # noqa: E402  (the tests' real redis-server, restartable on its AOF)

KINDS = ("embed-kill", "embed-term", "embed-actor", "embed-two", "embed-redis", "train-kill", "train-term",
         "train-elastic")
DEFAULT_TRIALS = {"embed-kill": 8, "embed-term": 6, "embed-actor": 6, "embed-two": 5, "embed-redis": 5,
                  "train-kill": 6, "train-term": 4, "train-elastic": 3}
# Fixed so the floats of every run are the same (the teacher's thread count changes them).
EMBED_ARGS = ("--shard-size", 32, "--batch-size", 16, "--cpus-per-worker", 2, "--workers", 1, "--no-progress",
              "--lease-seconds", 6)  # (a killed driver's leases come back soon)
TRAIN_EPOCHS, TRAIN_BATCH, TRAIN_ROWS = 2, 16, 256


@dataclass
class Outcome:
    kind: str
    trial: int
    ok: bool
    moment: str  # where the kill landed
    redone: int  # what the resume did again: rows (teacher pass) or steps (training)
    why: str = ""

    @property
    def unit(self) -> str:
        return "rows" if self.kind.startswith("embed") else "steps"


def _popen(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **CHILD_ENV})


def _done_shards(out: Path) -> int:
    return len(list(out.glob("part-*.parquet"))) if out.exists() else 0


def _wait(pred, proc: subprocess.Popen | None, timeout: float = 300.0) -> bool:
    """Poll ``pred`` until true (True), or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError("the moment to strike never came")


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("part-*.parquet"))} | {
        "manifest.json": (out / "manifest.json").read_bytes()}


def _rows_this_run(stdout: str) -> int:
    import re

    m = re.search(r"this run: (\d+) rows", stdout)
    return int(m.group(1)) if m else 0


class Campaign:
    def __init__(self, work: Path, head: RayHead, seed: int, images: int):
        self.work, self.head, self.seed = work, head, seed
        self.listing = work / "listing.parquet"
        run_child(distill_cmd("listing", make_face_jpegs(work / "images", images), "--out", self.listing))
        self.rows = images
        self.num_shards = -(-images // 32)
        from tests.toy_shards import write_toy_shards

        self.toy = write_toy_shards(work / "toy", rows=TRAIN_ROWS, shard_size=32, classes=4, size=32, dim=8)
        self._reference_bytes: dict[str, bytes] | None = None
        self._reference_trace: dict[int, dict] | None = None

    # The uninterrupted runs every trial is checked against, made when first needed.
    @property
    def reference_bytes(self) -> dict[str, bytes]:
        if self._reference_bytes is None:
            ref = self.work / "reference"
            shutil.rmtree(ref, ignore_errors=True)
            run_child(self.embed_cmd(ref))
            self._reference_bytes = _shard_bytes(ref)
        return self._reference_bytes

    @property
    def reference_trace(self) -> dict[int, dict]:
        if self._reference_trace is None:
            ref = self.work / "train-reference"
            shutil.rmtree(ref, ignore_errors=True)
            run_child(self.train_cmd(ref))
            self._reference_trace = self._trace(ref)
        return self._reference_trace

    # ------------------------------------------------------------------ commands

    def embed_cmd(self, out: Path, *extra) -> list[str]:
        return distill_cmd("embed", self.listing, "--teacher", MOBILEFACENET, "--out", out, "--address",
                           self.head.address, *EMBED_ARGS, *extra)

    def train_cmd(self, out: Path, *extra) -> list[str]:
        return distill_cmd("train", self.toy, "--out", out, "--epochs", TRAIN_EPOCHS, "--batch-size", TRAIN_BATCH,
                           "--student", "mobilenetv2", "--width", 0.35, "--checkpoint-every", 5, "--trace-samples", "--shuffle-buffer", 64,
                           "--no-progress", "--no-verify-shards", *extra)

    # ------------------------------------------------------------------ the teacher pass

    def _finish_embed(self, out: Path, extra=(), tries: int = 4) -> int:
        """Rerun until complete; rows the reruns embedded."""
        rows = 0
        for _ in range(tries):
            r = subprocess.run(self.embed_cmd(out, *extra), capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
            rows += _rows_this_run(r.stdout)
            if r.returncode == 0 and "embed complete" in r.stdout:
                return rows
        raise AssertionError(f"still not complete after {tries} reruns: {r.stderr[-1500:]}")

    def _check_embed(self, out: Path) -> str:
        got = _shard_bytes(out)
        if got != self.reference_bytes:
            differ = sorted(n for n in set(got) | set(self.reference_bytes) if got.get(n) != self.reference_bytes.get(n))
            return f"differs from the reference: {', '.join(differ[:5])}"
        import pyarrow.parquet as pq

        index = sorted(i for p in out.glob("part-*.parquet") for i in pq.read_table(p, columns=["index"]).column("index").to_pylist())
        return "" if index == list(range(self.rows)) else "rows missing or twice"

    def embed_trial(self, kind: str, rng: random.Random, out: Path) -> tuple[str, int, str]:
        shutil.rmtree(out, ignore_errors=True)
        target = rng.randrange(self.num_shards)  # strike once this many shards are done ...
        delay = rng.uniform(0, 1.0)  # ... and this long after
        moment = f"{target} shards done + {delay:.2f} s"
        extra: tuple = ()
        redis = None
        if kind == "embed-redis":  # append-only, fsync always: a SIGKILL loses no ledger write
            redis = RedisServer(self.work / f"redis-{out.name}", appendonly=True).start()
            extra = ("--ledger", redis.url)
        try:
            proc = _popen(self.embed_cmd(out, *extra))
            other = _popen(self.embed_cmd(out, *extra)) if kind == "embed-two" else None
            struck = _wait(lambda: _done_shards(out) >= target, proc)
            if struck:
                time.sleep(delay)
                struck = proc.poll() is None
            missing_at_kill = self.rows - min(self.rows, 32 * _done_shards(out))
            if not struck:
                moment += " (the run had finished: nothing struck)"
            elif kind in ("embed-kill", "embed-two"):
                proc.send_signal(signal.SIGKILL)
            elif kind == "embed-term":
                proc.send_signal(signal.SIGTERM)
            elif kind == "embed-actor":
                cmds = command_lines()
                actors = [p for p in process_tree(self.head.temp) if cmds.get(p, "").startswith("ray::EmbedWorker")]
                if actors:
                    os.kill(rng.choice(actors), signal.SIGKILL)
                else:
                    moment += " (no actor yet: nothing struck)"
            elif kind == "embed-redis":
                redis.stop(kill=True)
                pause = rng.uniform(0, 4.0)
                time.sleep(pause)
                redis.start()
                moment += f", redis down {pause:.1f} s"
            _, err = proc.communicate(timeout=600)
            if kind == "embed-term" and struck and proc.returncode not in (0, 143):
                return moment, 0, f"SIGTERM exit {proc.returncode}, not 143: {err[-500:]}"
            if "*** SIGTERM received" in err or "Aborted" in err:
                return moment, 0, f"an abort trace: {err[-500:]}"
            if kind == "embed-actor" and struck and proc.returncode != 0:
                return moment, 0, f"a dead actor failed the run (exit {proc.returncode}): {err[-500:]}"
            if other is not None:
                other.communicate(timeout=600)
            rows = self._finish_embed(out, extra)
            return moment, max(0, rows - missing_at_kill), self._check_embed(out)
        finally:
            if redis is not None:
                redis.stop(kill=True)

    # ------------------------------------------------------------------ training

    @staticmethod
    def _trace(out: Path) -> dict[int, dict]:
        trace: dict[int, dict] = {}
        for line in (out / "trace.jsonl").read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line a kill cut short
                continue
            trace[r["step"]] = r
        return trace

    def train_trial(self, kind: str, rng: random.Random, out: Path) -> tuple[str, int, str]:
        shutil.rmtree(out, ignore_errors=True)
        steps = TRAIN_EPOCHS * TRAIN_ROWS // TRAIN_BATCH
        target = rng.randrange(1, steps)
        trace = out / "trace.jsonl"

        def at_step() -> bool:
            if not trace.exists():
                return False
            lines = trace.read_text().splitlines()
            return bool(lines) and lines[-1].endswith("}") and json.loads(lines[-1])["step"] >= target

        proc = _popen(self.train_cmd(out))
        struck = _wait(at_step, proc)
        moment = f"step {target}"
        if not struck:
            moment += " (the run had finished: nothing struck)"
        else:
            proc.send_signal(signal.SIGKILL if kind == "train-kill" else signal.SIGTERM)
        _, err = proc.communicate(timeout=600)
        if kind != "train-kill" and struck and proc.returncode != 143:
            return moment, 0, f"SIGTERM exit {proc.returncode}, not 143: {err[-500:]}"
        first = self._trace(out)
        ckpts = sorted(int(n.split("-")[1]) for n in os.listdir(out / "checkpoints")) if (out / "checkpoints").is_dir() else []
        last_ckpt = ckpts[-1] if ckpts else 0
        redid = max(first, default=0) - last_ckpt
        extra = ("--workers", 2, "--address", self.head.address) if kind == "train-elastic" else ()
        r = subprocess.run(self.train_cmd(out, *extra), capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
        if r.returncode != 0:
            return moment, 0, f"the resume failed (exit {r.returncode}): {r.stderr[-800:]}"
        return moment, redid, self._check_train(self._trace(out))

    def _check_train(self, trace: dict[int, dict]) -> str:
        ref = self.reference_trace
        if sorted(trace) != sorted(ref):
            return f"steps {sorted(set(ref) ^ set(trace))[:5]} missing or extra"
        for epoch in range(TRAIN_EPOCHS):
            got = [i for s, r in trace.items() if r["epoch"] == epoch for i in r["index"]]
            want = [i for s, r in ref.items() if r["epoch"] == epoch for i in r["index"]]
            if len(got) != len(set(got)):
                return f"epoch {epoch}: a sample trained twice"
            if Counter(got) != Counter(want):
                return f"epoch {epoch}: not the reference's samples"
        if any(sorted(trace[s]["index"]) != sorted(ref[s]["index"]) for s in ref):
            return "a global batch differs from the reference's"
        return ""

    def run(self, kind: str, trial: int) -> Outcome:
        rng = random.Random(f"{self.seed}/{kind}/{trial}")
        out = self.work / f"{kind}-{trial}"
        try:
            if kind.startswith("embed"):
                moment, redid, why = self.embed_trial(kind, rng, out)
            else:
                moment, redid, why = self.train_trial(kind, rng, out)
        except (AssertionError, TimeoutError, subprocess.TimeoutExpired, OSError) as e:
            moment, redid, why = "-", 0, f"{type(e).__name__}: {e}"
        shutil.rmtree(out, ignore_errors=True)
        return Outcome(kind, trial, not why, moment, redid, why)


def parse_trials(text: str) -> dict[str, int]:
    if not text:
        return dict(DEFAULT_TRIALS)
    out = {}
    for part in text.split(","):
        kind, _, n = part.partition("=")
        if kind not in KINDS or not n.isdigit():
            raise SystemExit(f"--trials takes KIND=N,... with KIND one of {', '.join(KINDS)}; got {part!r}")
        out[kind] = int(n)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", default="", help="KIND=N,... (default: " +
                   ",".join(f"{k}={n}" for k, n in DEFAULT_TRIALS.items()) + ")")
    p.add_argument("--seed", type=int, default=0, help="draws every kill moment")
    p.add_argument("--images", type=int, default=384, help="listing rows of the teacher-pass trials (32 per shard)")
    p.add_argument("--json", type=Path, default=None, help="also write every trial's outcome here")
    p.add_argument("--work", default=None)
    add_idle_args(p)
    a = p.parse_args(argv)
    trials = parse_trials(a.trials)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    print_header("Fault campaign")
    # Correctness, not speed, is measured: the guard only records the load.
    print(f"load at the start: {settle(a, 'the campaign').label()}; seed {a.seed}; teacher mobilefacenet, "
          f"{a.images} images in {-(-a.images // 32)} shards of 32; training: toy shards, {TRAIN_ROWS} rows, "
          f"{TRAIN_EPOCHS} epochs of {TRAIN_ROWS // TRAIN_BATCH} steps, checkpoint every 5\n")
    outcomes: list[Outcome] = []
    t0 = time.perf_counter()
    with RayHead(num_cpus=4) as head:
        campaign = Campaign(work, head, a.seed, a.images)
        for kind, n in trials.items():
            for i in range(n):
                o = campaign.run(kind, i)
                outcomes.append(o)
                print(f"  {kind} #{i}: {'ok' if o.ok else 'FAILED'} at {o.moment}; redid {o.redone} {o.unit}"
                      + (f"; {o.why}" if o.why else ""), file=sys.stderr, flush=True)
    rows = []
    for kind in trials:
        mine = [o for o in outcomes if o.kind == kind]
        struck = [o for o in mine if "nothing struck" not in o.moment]
        worst = max(mine, key=lambda o: o.redone)
        rows.append([kind, f"{sum(o.ok for o in mine)}/{len(mine)}", len(struck),
                     f"{worst.redone} {worst.unit} (at {worst.moment})" if mine else "-",
                     "; ".join(o.why[:120] for o in mine if not o.ok) or "-"])
    print(table(["kind", "passed", "struck mid-run", "most redone by one resume", "failures"], rows))
    passed = sum(o.ok for o in outcomes)
    print(f"\n{passed}/{len(outcomes)} trials passed in {(time.perf_counter() - t0) / 60:.1f} min; "
          f"load average at the end: {loadavg()}")
    if a.json:
        a.json.write_text(json.dumps([{**o.__dict__, "unit": o.unit} for o in outcomes], indent=1))
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if passed == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
