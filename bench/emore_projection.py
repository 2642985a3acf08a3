"""Projected wall time of the full emore teacher pass and of one student epoch on N GPUs.

Measured here (2 CPU cores, no GPU), in one run:

- the embed worker's own CPU per image (read + JPEG decode + preprocess + Parquet encode +
  write, i.e. everything but the teacher): ``EmbedWorker.embed_shard`` driven without Ray
  over real 1024-row shards with a near-free 512-d teacher, minus that teacher's CPU;
- the per-shard fixed cost: one shard's listing rows read, its durable write (temp file,
  fsync, rename, directory fsync);
- the trainer's input CPU per image: ``distill.train.stream.make_dataset`` (Parquet read,
  shuffle buffer, JPEG decode, flip, scale) over the same shards, no model;
- Parquet bytes per row (a 512-d float32 embedding and its flip, index, label, path);
- ledger operations/s with 64 worker processes over emore's 5,687 shards
  (``bench/ledger.py``), and Redis's server-side CPU per operation;
- the student's forward FLOPs (``distill.train.student.build_student`` for 85,742 classes, 512-d).

Taken from DESIGN.md: IResNet-100 = 24.2 GFLOPs per 112x112 image, an H100 does ~990 dense
bf16 TFLOP/s, of which 40% is realistic. Every other assumption is an option below and is
printed with the result. The arithmetic is ``bench/projection.py`` (unit-tested).

    python bench/emore_projection.py
    python bench/emore_projection.py --cpus-per-gpu 24 --storage-gb-s 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/NAME.py` from anywhere

from bench.common import (  # noqa: E402
    add_idle_args,
    build_tiny_teacher,
    distill_cmd,
    loadavg,
    make_face_jpegs,
    print_header,
    run_child,
    settle,
    table,
    this_script_cmd,
)
from bench.projection import (  # noqa: E402
    EMORE_CLASSES,
    EMORE_ROWS,
    H100_BF16_TFLOPS,
    IRESNET100_GFLOPS,
    MFU,
    Cluster,
    Costs,
    project_student_epoch,
    project_teacher_pass,
)

EMORE_IMAGE_BYTES = 37.5e9 / EMORE_ROWS  # DESIGN.md: "roughly 35-40 GB of JPEG bytes"


# ---------------------------------------------------------------------------- child: CPU costs

def child_costs(a) -> dict:
    import numpy as np
    import tensorflow as tf

    from distill.embed.listing import ListingReader
    from distill.shards.format import encode_shard, shard_schema
    from distill.shards.plan import plan_shards
    from distill.shards.reader import ShardSet
    from distill.storage import open_storage
    from distill.teacher import Preprocessing, inspect_teacher
    from distill.train.order import plan_epoch
    from distill.train.stream import make_dataset
    from distill.workers.embed_actor import EmbedTask, EmbedWorker

    spec = inspect_teacher(a.teacher)
    out = Path(a.out)
    task = EmbedTask(teacher=spec, pre=Preprocessing(), out=str(out), run_id="bench0projection", batch_size=64,
                     flip=True, threads=os.cpu_count(), decode_threads=4)
    worker = EmbedWorker(task)
    reader = ListingReader(a.listing)
    plan = plan_shards(reader.num_rows, a.shard_size)

    # The teacher alone on preprocessed batches, both passes (image and mirror): subtracted from
    # the worker's CPU, so what is left is ours (preprocessing included).
    x = np.random.default_rng(0).integers(0, 256, (64, spec.height, spec.width, 3), dtype=np.uint8)
    xs = [tf.constant(Preprocessing().apply(v)) for v in (x, np.ascontiguousarray(x[:, :, ::-1]))]
    fn = tf.saved_model.load(spec.path).signatures[spec.signature]
    for _ in range(3):
        fn(**{spec.input_name: xs[0]})
    c0 = time.process_time()
    for _ in range(20):
        for v in xs:
            fn(**{spec.input_name: v})[spec.output_name].numpy()
    teacher_cpu = (time.process_time() - c0) / (20 * 64)

    for _ in worker.embed_shard(plan[0], reader.rows(plan[0].start, plan[0].stop)):  # warm-up, untimed
        pass
    c0, t0 = time.process_time(), time.perf_counter()
    rows = 0
    for s in plan[1:]:
        for _ in worker.embed_shard(s, reader.rows(s.start, s.stop)):
            pass
        rows += s.rows
    worker_cpu = (time.process_time() - c0) / rows
    worker_wall = (time.perf_counter() - t0) / rows

    # Per-shard fixed costs: listing rows, and the durable write of one shard's bytes.
    t0 = time.perf_counter()
    for s in plan:
        ListingReader(a.listing).rows(s.start, s.stop)
    rows_s = (time.perf_counter() - t0) / len(plan)
    storage = open_storage(str(out))
    data = storage.read_bytes(plan[1].name)
    t0 = time.perf_counter()
    for i in range(5):
        storage.write_atomic(f"probe-{i}.parquet", data)
    write_s = (time.perf_counter() - t0) / 5
    for i in range(5):
        storage.remove(f"probe-{i}.parquet")

    # The worker's per-image steps, one at a time on one thread, as a decode thread does them:
    # read + decode (``prepare``), then preprocess into the batch slot and mirror into the flip
    # batch. (The worker's total CPU above also holds TF's idle-spinning threads, so it
    # overstates what the steps cost.)
    from distill.images import prepare, read_file

    paths = [p for s in plan for p in reader.rows(s.start, s.stop).path]
    c0 = time.process_time()
    pixels = [prepare(read_file(p), spec.height, spec.width)[0] for p in paths]
    decode_cpu = (time.process_time() - c0) / len(paths)
    pre = Preprocessing()
    x = np.empty((64, spec.height, spec.width, 3), np.float32)
    x_flip = np.empty_like(x)
    c0 = time.process_time()
    for i, px in enumerate(pixels):
        x[i % 64] = pre.apply(px)
        x_flip[i % 64] = x[i % 64, :, ::-1]
    preprocess_cpu = (time.process_time() - c0) / len(pixels)

    # Parquet encode of one real shard's content.
    import pyarrow.parquet as pq

    t = pq.read_table(str(out / plan[1].name))
    emb = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    c0 = time.process_time()
    for _ in range(5):
        encode_shard(shard_schema(spec.embedding_dim), index=t.column("index").to_numpy(), label=t.column("label").to_numpy(),
                     path=t.column("path").to_pylist(), embedding=emb, embedding_flip=emb,
                     image=t.column("image").to_pylist(), run_id="x", k=1, start=0, stop=len(emb))
    encode_cpu = (time.process_time() - c0) / (5 * len(emb))

    sizes = [(out / s.name).stat().st_size for s in plan]
    image_bytes = sum(sum(len(b) for b in pq.read_table(str(out / s.name), columns=["image"]).column("image").to_pylist())
                      for s in plan)

    # The trainer's input pipeline over these shards, without a model.
    shards = ShardSet(location=str(out), run_id="bench0projection", names=tuple(s.name for s in plan),
                      rows=tuple(s.rows for s in plan), embedding_dim=spec.embedding_dim, num_classes=40,
                      input_size=(spec.height, spec.width), flip=True, dtype="float32")
    ep = plan_epoch(shards.rows, seed=0, epoch=0, world_size=1, rank=0, buffer=4096, global_batch=64)
    n = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for b in make_dataset(shards, ep, seed=0, flip=True, replica_batch=64):
        n += int(b["image"].shape[0])
    train_cpu = (time.process_time() - c0) / n
    train_wall = (time.perf_counter() - t0) / n
    return {
        "teacher_cpu_s": teacher_cpu, "worker_cpu_s": worker_cpu, "worker_wall_s": worker_wall,
        "decode_cpu_s": decode_cpu, "preprocess_cpu_s": preprocess_cpu,
        "rows_per_shard_read_s": rows_s, "shard_write_s": write_s, "encode_cpu_s": encode_cpu,
        "bytes_per_row": sum(sizes) / reader.num_rows, "image_bytes_per_row": image_bytes / reader.num_rows,
        "train_input_cpu_s": train_cpu, "train_input_wall_s": train_wall, "rows": reader.num_rows,
    }


def child_student_flops(a) -> dict:
    from bench.common import model_flops
    from distill.train.student import StudentSpec, build_student

    model = build_student(StudentSpec((112, 112), a.dim, EMORE_CLASSES, width=a.width))
    return {"gflops": model_flops(model) / 1e9, "params": int(model.count_params())}


def child_build_teacher(a) -> dict:
    build_tiny_teacher(Path(a.out), dim=a.dim)
    return {}


CHILDREN = {"costs": child_costs, "student-flops": child_student_flops, "build-teacher": child_build_teacher}


# ---------------------------------------------------------------------------- the run

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=6, help="real shards embedded to measure per-row costs")
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--dim", type=int, default=512, help="teacher embedding dim (IResNet-100's)")
    p.add_argument("--width", type=float, default=0.5, help="student width (the CLI's default)")
    p.add_argument("--gpus", default="1,8,100")
    p.add_argument("--cpus-per-gpu", type=float, default=12.0,
                   help="CPU cores per GPU free for decode (an 8x H100 node has ~192 vCPUs: 24 per GPU, half assumed free)")
    p.add_argument("--decode-threads", type=int, default=6,
                   help="embed actor decode threads (the CLI's default is the actor's CPUs: 6 in docs/cluster.md)")
    p.add_argument("--storage-gb-s", type=float, default=10.0, help="aggregate shared-storage bandwidth, GB/s")
    p.add_argument("--mfu", type=float, default=MFU)
    p.add_argument("--ledger-workers", type=int, default=64)
    p.add_argument("--ledger-shards", type=int, default=5_687)
    p.add_argument("--work", default=None)
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--teacher", help=argparse.SUPPRESS)
    p.add_argument("--listing", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    add_idle_args(p)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(CHILDREN[a.child](a)))
        return 0

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-proj-"))
    work.mkdir(parents=True, exist_ok=True)
    print_header("emore projection")
    load_start = settle(a, "the projection").label()
    images = make_face_jpegs(work / "images", a.shards * a.shard_size)
    listing = work / "listing.parquet"
    run_child(distill_cmd("listing", images, "--out", listing))
    teacher = work / f"tiny-{a.dim}"
    run_child(this_script_cmd("emore_projection.py", "--child", "build-teacher", "--out", teacher, "--dim", a.dim))
    out = work / "shards"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    c = run_child(this_script_cmd("emore_projection.py", "--child", "costs", "--teacher", teacher, "--listing", listing,
                                  "--out", out, "--shard-size", a.shard_size)).json()
    student = run_child(this_script_cmd("emore_projection.py", "--child", "student-flops", "--dim", a.dim,
                                        "--width", a.width)).json()
    from bench.ledger import run_backend

    led_args = SimpleNamespace(shards=a.ledger_shards, workers=a.ledger_workers, seconds=600.0)
    led = {b: run_backend(b, work / "ledger", led_args) for b in ("file", "redis-aof")}

    pipeline_cpu = c["worker_cpu_s"] - c["teacher_cpu_s"]
    non_image = c["bytes_per_row"] - c["image_bytes_per_row"]
    print(f"Measured with {a.shards} shards x {a.shard_size} rows of 112x112 JPEGs ({c['image_bytes_per_row']:.0f} B "
          f"mean), a {a.dim}-d teacher, flip on; ledger: {a.ledger_workers} processes over {a.ledger_shards:,} shards. "
          f"Load avg at start {load_start}.\n")
    print(table(["measured here (CPU time of one thread unless said)", "value"], [
        ["read + JPEG decode per image (`read_file` + `prepare`)", f"{c['decode_cpu_s'] * 1000:.3f} ms"],
        ["preprocess per image into its batch slot, and its mirror (decode threads)",
         f"{c['preprocess_cpu_s'] * 1000:.3f} ms"],
        ["Parquet encode per row (`encode_shard`, 512-d + flip + image)", f"{c['encode_cpu_s'] * 1000:.3f} ms"],
        ["cross-check: embed worker process CPU per image minus the teacher's (all threads, incl. TF spin)",
         f"{pipeline_cpu * 1000:.3f} ms"],
        ["per shard: listing rows read (driver, overlapped)", f"{c['rows_per_shard_read_s'] * 1000:.1f} ms"],
        ["per shard: durable write (temp, fsync, rename, dir fsync)",
         f"{c['shard_write_s'] * 1000:.1f} ms ({c['bytes_per_row'] * a.shard_size / 1e6 / c['shard_write_s']:.0f} MB/s)"],
        ["trainer input CPU per image (Parquet read, shuffle, decode, flip, scale)", f"{c['train_input_cpu_s'] * 1000:.3f} ms"],
        ["shard bytes per row (measured / with emore's ~6.4 KB JPEGs)",
         f"{c['bytes_per_row']:.0f} B / {non_image + EMORE_IMAGE_BYTES:.0f} B"],
        ["file ledger, 64 processes, whole run", f"{led['file']['ops_per_s']:,.0f} ops/s"],
        ["Redis ledger (AOF fsync always), 64 processes", f"{led['redis-aof']['ops_per_s']:,.0f} ops/s on this 2-core box; "
         f"server CPU {led['redis-aof']['server_us_per_op']:.0f} µs/op = {1e6 / led['redis-aof']['server_us_per_op']:,.0f} ops/s per server core"],
        [f"student forward FLOPs (MobileNetV2 x{a.width}, {a.dim}-d, {EMORE_CLASSES:,} classes)",
         f"{student['gflops']:.3f} GFLOPs ({student['params']:,} parameters)"],
    ]))
    print()
    base = Costs(
        decode_cpu_s=c["decode_cpu_s"], preprocess_cpu_s=c["preprocess_cpu_s"], train_decode_cpu_s=c["train_input_cpu_s"],
        encode_cpu_s_per_row=c["encode_cpu_s"], shard_write_s=c["shard_write_s"],
        shard_bytes_per_row=non_image + EMORE_IMAGE_BYTES, ledger_ops_per_s=led["file"]["ops_per_s"],
    )
    redis_capacity = 1e6 / led["redis-aof"]["server_us_per_op"]
    gpus = [int(x) for x in a.gpus.split(",")]
    rows = []
    for n in gpus:
        cluster = Cluster(gpus=n, cpus_per_gpu=a.cpus_per_gpu, decode_threads=a.decode_threads,
                          storage_gb_s=a.storage_gb_s, mfu=a.mfu)
        for name, costs in (("file", base), ("redis", replace(base, ledger_ops_per_s=redis_capacity))):
            t = project_teacher_pass(costs, cluster)
            rows.append([n, name, _t(t.gpu_s), _t(t.decode_s), _t(t.write_s), _t(t.storage_s),
                         _t(t.ledger_s), f"**{_t(t.wall_s)}**", t.bound])
    print(f"### Teacher pass, all of emore ({EMORE_ROWS:,} images, flip on: 2 teacher passes per image, "
          f"IResNet-100 {IRESNET100_GFLOPS} GFLOPs, H100 {H100_BF16_TFLOPS:g} TFLOP/s x {a.mfu:.0%}, one actor per GPU "
          f"with {a.decode_threads} decode threads, {a.cpus_per_gpu:g} free cores per GPU, storage "
          f"{a.storage_gb_s:g} GB/s, shards of 1024; redis = one server core's measured capacity)\n")
    print(table(["GPUs", "ledger", "GPU compute", "decode + preprocess threads", "shard encode + write (1 thread)", "storage write", "ledger ops", "wall", "bound"], rows))
    print("\nEvery column runs beside the others (the actor overlaps them), so the wall time is the largest.")
    print()
    rows = []
    for n in gpus:
        cluster = Cluster(gpus=n, cpus_per_gpu=a.cpus_per_gpu, storage_gb_s=a.storage_gb_s, mfu=a.mfu)
        t = project_student_epoch(base, cluster, student["gflops"])
        rows.append([n, _t(t.gpu_s), _t(t.decode_s), _t(t.storage_s), f"**{_t(t.wall_s)}**", t.bound])
    print(f"### One student epoch ({EMORE_ROWS:,} rows, 3 x {student['gflops']:.3f} GFLOPs per image at "
          f"{a.mfu:.0%} of {H100_BF16_TFLOPS:g} TFLOP/s, input on {a.cpus_per_gpu:g} cores per GPU)\n")
    print(table(["GPUs", "GPU compute", "CPU input", "storage read", "wall", "bound"], rows))
    print(f"\nload average at the end: {loadavg()}")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _t(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


if __name__ == "__main__":
    sys.exit(main())
