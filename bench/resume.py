"""Resume cost of ``distill embed``: what a rerun costs, and what a kill at ~50% throws away.

1. An uninterrupted run (the reference: shard checksums).
2. The same command again on the finished directory: wall time, teacher rows run, files
   touched (inode + mtime of every file before and after).
3. A fresh run SIGKILLed once half of its shards are done; then the same command again:
   shards done / in flight (leased) at the kill, shard files rewritten by the resume,
   rows the resume embedded vs rows missing at the kill, and whether every shard's sha256
   equals the uninterrupted run's.

All runs use one private Ray head (``--address``): killing a driver then leaves no orphaned
local cluster, and the comparison is not blurred by ~10 s of ``ray.init``.

    python bench/resume.py                       # mobilefacenet, 1024 images, 16 shards
    python bench/resume.py --images 2048 --shard-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/NAME.py` from anywhere

from bench.common import (  # noqa: E402
    CHILD_ENV,
    MOBILEFACENET,
    RayHead,
    add_idle_args,
    distill_cmd,
    loadavg,
    make_face_jpegs,
    print_header,
    run_child,
    settle,
    table,
)
from bench.projection import rewritten  # noqa: E402
from distill.shards.plan import parse_shard_name, shard_at, shard_name  # noqa: E402


def file_ids(folder: Path) -> dict[str, tuple[int, int]]:
    """{name: (inode, mtime_ns)} of the shard files."""
    out = {}
    for e in os.scandir(folder):
        if e.name.startswith("part-") and e.name.endswith(".parquet"):
            st = e.stat()
            out[e.name] = (st.st_ino, st.st_mtime_ns)
    return out


def ledger_counts(folder: Path) -> tuple[set[int], set[int]]:
    """(done shards, leased-not-done shards) from the file ledger."""
    done, leased = set(), set()
    led = folder / "_ledger"
    if led.is_dir():
        for name in os.listdir(led):
            stem, _, kind = name.partition(".")
            if stem.isdigit():
                (done if kind == "done" else leased if kind == "lease" else set()).add(int(stem))
    return done, leased - done


def checksums(folder: Path) -> dict[str, str]:
    with open(folder / "manifest.json") as f:
        return {s["name"]: s["sha256"] for s in json.load(f)["shards"]}


def rows_this_run(stdout: str) -> int:
    m = re.search(r"this run: (\d+) rows", stdout)
    if not m:
        raise RuntimeError(f"unexpected CLI output: {stdout[-2000:]}")
    return int(m.group(1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--teacher", default=str(MOBILEFACENET))
    p.add_argument("--kill-at", type=float, default=0.5, help="fraction of shards done when the driver is killed")
    p.add_argument("--work", default=None)
    add_idle_args(p)
    a = p.parse_args(argv)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    print_header("Resume cost")
    images = make_face_jpegs(work / "images", a.images)
    listing = work / "listing.parquet"
    run_child(distill_cmd("listing", images, "--out", listing))
    num_shards = -(-a.images // a.shard_size)
    print(f"{a.images} images, {num_shards} shards of {a.shard_size}, batch {a.batch_size}, flip on (default), "
          f"teacher {a.teacher}, file ledger, private Ray head\n")

    help_s = run_child(distill_cmd("--help")).seconds
    with RayHead() as head:
        def embed(out: Path) -> list[str]:
            return distill_cmd("embed", listing, "--teacher", a.teacher, "--out", out, "--shard-size", a.shard_size,
                               "--batch-size", a.batch_size, "--address", head.address, "--no-progress")

        ref = work / "ref"
        shutil.rmtree(ref, ignore_errors=True)
        load_full = settle(a, "the uninterrupted run").label()
        full = run_child(embed(ref))
        before = file_ids(ref)
        rerun = run_child(embed(ref))
        after = file_ids(ref)
        load_rerun = settle(a, "the rerun").label()

        killed = work / "killed"
        shutil.rmtree(killed, ignore_errors=True)
        load_kill = settle(a, "the killed run").label()
        proc = subprocess.Popen(embed(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, **CHILD_ENV})
        target = max(1, int(num_shards * a.kill_at))
        while True:
            done, _ = ledger_counts(killed)
            if len(done) >= target or proc.poll() is not None:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done_at_kill, leased_at_kill = ledger_counts(killed)
        files_at_kill = file_ids(killed)
        if proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"the run finished before it could be killed (exit {proc.returncode}); use more --images")
        time.sleep(1.0)  # the actor may still rename the shard it was writing: that file is adopted, not redone
        files_before_resume = file_ids(killed)
        resume = run_child(embed(killed))
        files_after = file_ids(killed)

    rows_missing = sum(shard_at(k, a.images, a.shard_size).rows for k in range(num_shards)
                       if shard_name(k) not in files_before_resume)
    redone = rewritten(files_before_resume, files_after)
    present = {parse_shard_name(n) for n in files_before_resume}
    lost = sorted(leased_at_kill - present)
    same = checksums(killed) == checksums(ref)

    print(table(["run", "wall s", "teacher rows run", "shard files rewritten", "load avg at start"], [
        ["uninterrupted", f"{full.seconds:.1f}", rows_this_run(full.stdout), f"{len(before)} written", load_full],
        ["rerun of the finished job", f"{rerun.seconds:.2f}", rows_this_run(rerun.stdout),
         len(rewritten(before, after)), load_rerun],
        ["`distill --help` (Python + CLI start, for scale)", f"{help_s:.2f}", "-", "-", "-"],
        [f"killed (SIGKILL) at {len(done_at_kill)}/{num_shards} shards done", "-", "-", "-", load_kill],
        ["resume after the kill", f"{resume.seconds:.1f}", rows_this_run(resume.stdout), len(redone), "-"],
    ]))
    print()
    print(table(["after the SIGKILL", ""], [
        ["shards done in the ledger at the kill", len(done_at_kill)],
        ["shards leased (in flight) at the kill", f"{len(leased_at_kill)} {sorted(leased_at_kill)}"],
        ["shard files present at the kill / when the resume started",
         f"{len(files_at_kill)} / {len(files_before_resume)}"],
        ["rows missing when the resume started", rows_missing],
        ["rows the resume embedded", rows_this_run(resume.stdout)],
        ["shard files the resume rewrote", f"{len(redone)} {redone}"],
        ["shards whose partial work was lost (in flight, no file)", f"{len(lost)} {lost}"],
        ["every shard's sha256 equals the uninterrupted run's", "yes" if same else "NO"],
    ]))
    print(f"\nload average at the end: {loadavg()}")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if same and not redone else 1


if __name__ == "__main__":
    sys.exit(main())
