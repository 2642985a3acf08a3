"""Shards on an object store against a local disk, side by side in one run: is the store ever
the bottleneck?

1. The teacher pass: the real ``distill embed`` of the same glint12 faces with the real
   mobilefacenet teacher, writing shards to a local directory and to ``s3://`` on a loopback
   S3 API server (``moto_server``, tests/s3_server.py), both with the Redis ledger so only the
   store differs; and with the images themselves in the bucket too (a list file of them there,
   listed there: each image one GET); rounds interleaved. Rate = rows / the command's
   wall time (the Ray cluster is shared, so start-up is a connect, not a cluster start).
2. The training input: ``bench/train_input.py``'s streamed / in-memory step-rate child on the
   same shards, read from the disk and from the store (copied there byte for byte), and the
   stream alone (no model) in images/s.

The server runs on the same 2 cores (a real store's CPU is not the node's), so its CPU counts
against the store here: the comparison is pessimistic for the store.

    python bench/object_store.py [--images 2048] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the loopback servers the tests use

from bench.common import (  # noqa: E402
    GLINT12,
    MOBILEFACENET,
    RayHead,
    add_idle_args,
    distill_cmd,
    loadavg,
    print_header,
    run_child,
    settle,
    table,
    this_script_cmd,
)
from bench.projection import median  # noqa: E402

BUCKET = "distill-bench"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2048, help="glint12 faces embedded")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--phase-steps", type=int, default=12, help="train_input.py's steps per phase")
    p.add_argument("--work", default=None)
    add_idle_args(p)
    a = p.parse_args(argv)

    from redis_server import RedisServer
    from s3_server import S3_CREDENTIALS, S3Server

    for k, v in S3_CREDENTIALS.items():  # (before the Ray head starts: its workers are the nodes)
        os.environ.setdefault(k, v)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-store-"))
    work.mkdir(parents=True, exist_ok=True)
    print_header("Object store against local disk")
    paths = sorted(str(f) for f in GLINT12.glob("*/*") if f.is_file())[: a.images]
    folders = sorted({Path(f).parent.name for f in paths})
    lst = work / "list.txt"
    lst.write_text("".join(f"{f}\t{folders.index(Path(f).parent.name)}\n" for f in paths))
    listing = work / "listing.parquet"
    run_child(distill_cmd("listing", lst, "--out", listing))

    with S3Server() as s3, RedisServer(work / "redis") as redis, RayHead() as head:
        s3.make_bucket(BUCKET)
        env = {**s3.env, "DISTILL_CACHE": str(work / "cache")}
        # The same faces in the bucket too (a list file beside them), listed there: the actors
        # read each image by one GET.
        for f in paths:
            s3.client().put_object(Bucket=BUCKET, Key=f"faces/{Path(f).parent.name}/{Path(f).name}",
                                   Body=Path(f).read_bytes())
        s3.client().put_object(Bucket=BUCKET, Key="faces/list.txt", Body="".join(
            f"{Path(f).parent.name}/{Path(f).name}\t{folders.index(Path(f).parent.name)}\n" for f in paths).encode())
        store_listing = f"s3://{BUCKET}/lists/listing.parquet"
        run_child(distill_cmd("listing", f"s3://{BUCKET}/faces/list.txt", "--out", store_listing), env=env)
        embed_rows = []
        for r in range(a.rounds):
            for where in ("local", "s3", "s3 (images too)"):
                out = {"local": str(work / f"shards-{r}"), "s3": f"s3://{BUCKET}/shards-{r}"}.get(
                    where, f"s3://{BUCKET}/shards-from-store-{r}")
                load = settle(a, f"the {where} teacher pass").label()
                res = run_child(distill_cmd("embed", store_listing if "images" in where else listing, "--teacher",
                                            MOBILEFACENET, "--out", out, "--ledger", redis.url, "--shard-size",
                                            a.shard_size, "--address", head.address, "--no-progress"), env=env)
                embed_rows.append((where, r + 1, len(paths) / res.seconds, res.seconds, load))
        print(f"1. Teacher pass: {len(paths)} glint12 faces, mobilefacenet teacher, flip on, shards of "
              f"{a.shard_size}, Redis ledger, one actor on the shared 2-CPU Ray cluster; the images read from "
              "the disk, or (images too) from the bucket by the listing made there\n")
        print(table(["shards to", "round", "images/s (whole command)", "wall s", "load avg at start"],
                    [[w, r, f"{rate:.1f}", f"{wall:.1f}", load] for w, r, rate, wall, load in embed_rows]))
        local_rate = median([x[2] for x in embed_rows if x[0] == "local"])
        for where in ("s3", "s3 (images too)"):
            rate = median([x[2] for x in embed_rows if x[0] == where])
            print(f"\nmedian {where} / local: **{rate / local_rate:.2f}**", end="")
        print("\n")

        # 2. The training input from the same shards, on the disk and on the store.
        input_rows = []
        for r in range(a.rounds):
            for where, shards in (("local", str(work / "shards-0")), ("s3", f"s3://{BUCKET}/shards-0")):
                load = settle(a, f"the {where} training input").label()
                res = run_child(this_script_cmd("train_input.py", "--child", "ratio", "--shards", shards, "--out",
                                                work / f"ratio-{where}-{r}", "--phase-steps", a.phase_steps,
                                                "--student", "mobilefacenet", "--resolution", 64,
                                                "--alone-threads", "2"), env=env)
                got = res.json()
                ratios = [s / m for s, _, m, _ in got["phases"]]
                rate, _ = got["alone"]
                input_rows.append((where, r + 1, median(ratios), rate * 64, load))
        print("2. Training input: the default student (MobileFaceNet at 64 px), batch 64, the same shards; "
              "streamed / in-memory step rate, and the stream alone\n")
        print(table(["shards on", "round", "streamed / in-memory", "stream alone img/s", "load avg at start"],
                    [[w, r, f"**{q:.2f}**", f"{img:.0f}", load] for w, r, q, img, load in input_rows]))
        for where in ("local", "s3"):
            print(f"\n{where}: median streamed / in-memory {median([x[2] for x in input_rows if x[0] == where]):.2f}, "
                  f"stream alone {median([x[3] for x in input_rows if x[0] == where]):.0f} img/s", end="")
        print(f"\n\nload average at the end: {loadavg()}")
        print(json.dumps({"embed": embed_rows, "input": input_rows}), file=sys.stderr)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
