"""Training input: is the shard stream ever the bottleneck, and does memory grow with shards?

1. Steps/s of the student (``distill.train.loop``'s own model, optimizer and step function)
   fed by the real stream (``distill.train.stream.make_dataset`` over real shards: Parquet read,
   shuffle buffer, JPEG decode, flip, scale) vs the same step on batches already decoded in
   memory. Phases alternate (stream, memory, stream, memory, ...) in one process so load
   from other work hits both alike; the ratio is stream / memory (target >= 0.9).
2. Peak RSS of the real ``distill train`` CLI over one epoch of 4, 16 and 64 shards of the
   same size (shuffle buffer smaller than the smallest set): it should stay flat.

Shards come from the real ``distill embed`` (flip on, images stored) of 112x112 JPEGs made
from the ORL faces, with a tiny random 512-d teacher: the teacher's cost is not measured
here, only what the trainer reads.

    python bench/train_input.py
    python bench/train_input.py --shard-counts 4,16 --phase-steps 10
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/NAME.py` from anywhere

from bench.common import (  # noqa: E402
    RayHead,
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
from bench.projection import median  # noqa: E402

# ---------------------------------------------------------------------------- child: steps/s

def child_ratio(a) -> dict:
    """Alternate streamed and in-memory phases of the same compiled step."""
    import numpy as np
    import tensorflow as tf

    from distill.shards.format import PARQUET_READ
    from distill.shards.reader import open_shards
    from distill.train.config import TrainConfig, resolve
    from distill.train.loop import _make_step, _optimizer
    from distill.train.order import plan_epoch
    from distill.train.stream import make_dataset
    from distill.train.student import build_student

    PARQUET_READ["use_threads"] = a.arrow_threads  # (the default: False; --arrow-threads compares)

    cfg = TrainConfig(shards=a.shards, out=a.out, batch_size=a.batch_size, shuffle_buffer=a.shuffle_buffer,
                      width=a.width, student=a.student, resolution=a.resolution, view_prob=a.view_prob)
    shards = open_shards(a.shards)
    config = resolve(cfg, shards)
    strategy = tf.distribute.get_strategy()
    model = build_student(config.student)
    optimizer = _optimizer(cfg, config.with_schedule(shards.total_rows).schedule)
    optimizer.build(model.trainable_variables)
    step = _make_step(model, optimizer, strategy, config.loss, cfg.batch_size, False)
    go_on = tf.constant(0.0)  # the step's stop flag: never set here

    epoch = 0

    def stream():
        nonlocal epoch
        while True:  # epoch after epoch, as the trainer does
            plan = plan_epoch(shards.rows, seed=0, epoch=epoch, world_size=1, rank=0, buffer=cfg.shuffle_buffer,
                              global_batch=cfg.batch_size)
            epoch += 1
            yield from make_dataset(shards, plan, seed=0, flip=config.flip, replica_batch=cfg.batch_size,
                                    view_prob=config.view_prob)

    live = stream()
    memory = [next(live) for _ in range(a.memory_batches)]  # decoded once, then reused

    def run(source, steps: int) -> tuple[float, float]:
        """(steps/s, process CPU seconds per step)."""
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(steps):
            parts, _ = step(next(source) if source is live else memory[i % len(memory)], go_on)
            float(parts["loss"])  # the trainer reads the losses every step; so do we
        return steps / (time.perf_counter() - t0), (time.process_time() - c0) / steps

    run(live, a.warmup_steps)
    run(None, a.warmup_steps)
    phases = []
    for _ in range(a.rounds):
        # The stream kept prefetching during the memory phase: spend what it buffered, untimed.
        run(live, a.warmup_steps)
        s = run(live, a.phase_steps)
        m = run(None, a.phase_steps)
        phases.append((*s, *m))
    # The stream alone, no model: how many batches/s the input can deliver, and its CPU, with
    # tf.data given 1, 2, ... threads (each op one thread inside): does the input scale?
    alone = {}
    for threads in [0] + [int(x) for x in a.alone_threads.split(",") if x]:
        plan = plan_epoch(shards.rows, seed=0, epoch=epoch, world_size=1, rank=0, buffer=cfg.shuffle_buffer,
                          global_batch=cfg.batch_size)
        ds = make_dataset(shards, plan, seed=0, flip=config.flip, replica_batch=cfg.batch_size,
                          view_prob=config.view_prob)
        if threads:
            opts = tf.data.Options()
            opts.threading.private_threadpool_size = threads
            opts.threading.max_intra_op_parallelism = 1
            ds = ds.with_options(opts)
        alone_it = iter(ds)
        for _ in range(3):
            next(alone_it)
        n = min(a.phase_steps * 2, plan.steps - 3)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            next(alone_it)
        alone[threads] = (n / (time.perf_counter() - t0), (time.process_time() - c0) / n)
    return {"phases": phases, "alone": alone[0], "alone_threads": alone, "epochs_started": epoch,
            "images_bytes_mean": float(np.mean([len(x) for x in _sample_images(a.shards)])),
            "student_params": int(model.count_params())}


def _sample_images(location: str):
    """The first shard's stored images (a local directory or a store URI)."""
    import numpy as np

    from distill.shards.reader import ShardReader, open_shards

    shards = open_shards(location)
    return ShardReader(shards).read_rows(np.arange(shards.rows[0]), ["image"]).column("image").to_pylist()


def child_build_teacher(a) -> dict:
    build_tiny_teacher(Path(a.out), dim=a.dim)
    return {}


# ---------------------------------------------------------------------------- the run

def make_shards(work: Path, head: RayHead, teacher: Path, images: Path, n_shards: int, a) -> Path:
    """``n_shards`` shards of ``--shard-size`` rows by the real CLI, from the first images."""
    out = work / f"shards-{n_shards}"
    if (out / "manifest.json").exists():
        return out
    rows = n_shards * a.shard_size
    paths = sorted(str(p) for p in images.glob("*/*.jpg"))[:rows]
    folders = sorted({Path(p).parent.name for p in paths})
    lst = work / f"list-{n_shards}.txt"
    lst.write_text("".join(f"{p}\t{folders.index(Path(p).parent.name)}\n" for p in paths))
    listing = work / f"listing-{n_shards}.parquet"
    run_child(distill_cmd("listing", lst, "--out", listing))
    run_child(distill_cmd("embed", listing, "--teacher", teacher, "--out", out, "--shard-size", a.shard_size,
                          "--batch-size", 64, "--address", head.address, "--no-progress"))
    return out


def ratio_section(a, shards: Path, work: Path) -> None:
    """1. streamed vs in-memory steps/s on ``shards``, and the stream alone by thread count."""
    load = settle(a, "the streamed / in-memory phases").label()
    res = run_child(this_script_cmd(
        "train_input.py", "--child", "ratio", "--shards", shards, "--out", work / "ratio-out",
        "--batch-size", a.batch_size, "--shuffle-buffer", a.shuffle_buffer, *(["--width", a.width] if a.width else []),
        "--student", a.student, *(["--resolution", a.resolution] if a.resolution else []), "--view-prob", a.view_prob,
        "--alone-threads", a.alone_threads, "--warmup-steps", a.warmup_steps, "--phase-steps", a.phase_steps,
        "--rounds", a.rounds, "--memory-batches", a.memory_batches, *(["--arrow-threads"] if a.arrow_threads else [])))
    r = res.json()
    rows = [[i + 1, f"{s:.3f}", f"{m:.3f}", f"**{s / m:.2f}**", f"{sc:.2f} / {mc:.2f}"]
            for i, (s, sc, m, mc) in enumerate(r["phases"])]
    ratio = median([s / m for s, _, m, _ in r["phases"]])
    input_cpu = median([sc - mc for _, sc, _, mc in r["phases"]])
    step_cpu = median([mc for *_, mc in r["phases"]])
    alone_rate, alone_cpu = r["alone"]
    res_text = f" at {a.resolution} px" if a.resolution else ""
    print(f"Student {a.student}{res_text} ({r['student_params']:,} parameters), batch {a.batch_size}, shards {shards}, "
          f"stored JPEG {r['images_bytes_mean']:.0f} B mean, flip on, views with probability {a.view_prob}, "
          f"shuffle buffer {a.shuffle_buffer}, Parquet decoded {'on Arrow threads' if a.arrow_threads else 'on the calling thread'}; {a.phase_steps} steps per phase after {a.warmup_steps} "
          f"warm-up steps each; load avg at start {load}\n")
    print(table(["round", "streamed steps/s", "in-memory steps/s", "streamed / in-memory",
                 "CPU s per step: streamed / in-memory"], rows))
    print(f"\nmedian streamed / in-memory: **{ratio:.2f}**. The stream alone (no model) delivers "
          f"{alone_rate:.1f} batches/s ({alone_rate * a.batch_size:.0f} img/s) using {alone_cpu:.3f} CPU s per batch "
          f"({1000 * alone_cpu / a.batch_size:.2f} ms/img); beside the model it adds {input_cpu:.3f} CPU s per step to "
          f"the step's {step_cpu:.2f}, so on these 2 shared cores a ratio of about "
          f"{step_cpu / (step_cpu + max(input_cpu, 0)):.2f} is the CPU the input needs, not waiting on it. "
          f"Epochs started: {r['epochs_started']}.\n")
    threads = {int(k): v for k, v in r["alone_threads"].items() if int(k)}
    if threads:
        print(table(["tf.data threads", "stream alone img/s", "img/s per thread", "CPU ms per image"],
                    [[n, f"{rate * a.batch_size:.0f}", f"{rate * a.batch_size / n:.0f}",
                      f"{1000 * cpu / a.batch_size:.2f}"] for n, (rate, cpu) in sorted(threads.items())]))
        print()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--shard-counts", default="4,16,64", help="shard sets for the RSS runs")
    p.add_argument("--ratio-shards", type=int, default=64,
                   help="shard set for the steps/s ratio (big enough that the phases stay in one epoch)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shuffle-buffer", type=int, default=256)
    p.add_argument("--width", type=float, default=None, help="student width (default: the CLI's)")
    p.add_argument("--student", default="mobilenetv2", help="student backbone (distill train --student)")
    p.add_argument("--resolution", type=int, default=None, help="student working resolution (distill train --resolution)")
    p.add_argument("--view-prob", type=float, default=0.0, help="train on the stored views this often (shards with views)")
    p.add_argument("--alone-threads", default="1,2", help="tf.data thread counts for the stream-alone rates")
    p.add_argument("--ratio-only", metavar="SHARDS",
                   help="only the streamed / in-memory ratio and the stream alone, on these (real) shards")
    p.add_argument("--dim", type=int, default=512, help="teacher embedding dim (IResNet-100's)")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--phase-steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--memory-batches", type=int, default=8)
    p.add_argument("--work", default=None)
    p.add_argument("--arrow-threads", action="store_true",
                   help="decode Parquet on Arrow's thread pool (use_threads=True), against the reader's calling thread")
    p.add_argument("--child", choices=["ratio", "build-teacher"], help=argparse.SUPPRESS)
    p.add_argument("--shards", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    add_idle_args(p)
    a = p.parse_args(argv)
    if a.child == "ratio":
        print(json.dumps(child_ratio(a)))
        return 0
    if a.child == "build-teacher":
        print(json.dumps(child_build_teacher(a)))
        return 0

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    print_header("Training input")
    if a.ratio_only:
        ratio_section(a, Path(a.ratio_only), work)
        return 0
    counts = sorted({int(x) for x in a.shard_counts.split(",")} | {a.ratio_shards})
    images = make_face_jpegs(work / "images", max(counts) * a.shard_size)
    teacher = work / f"tiny-{a.dim}"
    run_child(this_script_cmd("train_input.py", "--child", "build-teacher", "--out", teacher, "--dim", a.dim))
    with RayHead() as head:
        sets = {n: make_shards(work, head, teacher, images, n, a) for n in counts}
    ratio_section(a, sets[a.ratio_shards], work)

    # 2. peak RSS over one epoch as the shard count grows; then the largest set cut to the smaller
    # sets' step counts, which separates what more shards cost from what more steps cost.
    counts = sorted(int(x) for x in a.shard_counts.split(","))
    width = ["--width", a.width] if a.width else []
    runs = [(n, None) for n in counts] + [(counts[-1], n * a.shard_size // a.batch_size) for n in counts[:-1]]
    rows = []
    for n, max_steps in runs:
        load = settle(a, f"the {n}-shard epoch").label()
        out = work / f"student-{n}-{max_steps}"
        shutil.rmtree(out, ignore_errors=True)
        extra = ["--max-steps", max_steps] if max_steps else []
        res = run_child(distill_cmd("train", sets[n], "--out", out, "--epochs", 1, "--batch-size", a.batch_size,
                                    "--shuffle-buffer", a.shuffle_buffer, *width, "--no-progress",
                                    "--checkpoint-every", 1_000_000, *extra))
        m = re.search(r"trained to step (\d+) .* in ([\d.]+)s, ([\d.]+) images/s", res.stdout)
        shard_bytes = sum(f.stat().st_size for f in sets[n].glob("part-*.parquet"))
        rows.append([n, n * a.shard_size, f"{shard_bytes / 2**20:.1f}", m.group(1) + ("" if max_steps else " (1 epoch)"),
                     m.group(3), f"{res.peak_rss_mib:.0f}", load])
    print(table(["shards", "rows", "shard bytes MiB", "steps", "images/s", "peak RSS MiB (whole CLI)",
                 "load avg at start"], rows))
    print(f"\nload average at the end: {loadavg()}")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
