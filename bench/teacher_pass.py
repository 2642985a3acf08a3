"""Teacher pass throughput, four ways, same teacher, same images, same batch size, one run.

(a) ``distill embed`` (the real CLI, its own local Ray, file ledger);
(b) the per-image loop of the original notes: decode one image, call the teacher on a batch
    of one, append, save;
(c) Ray Data: read_binary_files -> map_batches(decode) -> map_batches(teacher actor pool)
    -> write_parquet, plain (no CheckpointConfig: its filter actors stall on 2 CPUs);
(d) the teacher alone on in-memory preprocessed batches: the compute ceiling.
Plus two diagnostics: (a0) ``EmbedWorker.embed_shard`` driven in-process without Ray, and
(d0) the ceiling with TensorFlow's default threading instead of the actors' settings.

Every variant runs in its own child process (same start-up, no shared threads or caches),
with ``--no-flip`` (one teacher call per image). Steady-state rate = rows finished between
the first and the last completion event / the time between them (start-up and warm-up left
out); wall = the whole child process, start-up included.

    python bench/teacher_pass.py                      # both teachers, 1024 images, (a) (b) (c) (d), ~5 min
    python bench/teacher_pass.py --rounds 3 --variants d,a,b,c,a0           # what docs/BENCHMARKS.md shows
    python bench/teacher_pass.py --rounds 3 --variants d,a,a15,d0           # niceness and TF threading checks
    python bench/teacher_pass.py --rounds 2 --variants a,a1,a2 --teachers mobilefacenet   # decode threads
    python bench/teacher_pass.py --rounds 3 --variants d,a --teachers mobilefacenet,mobilefacenet-onnx   # ONNX

Teachers: ``mobilefacenet`` (the shared SavedModel), ``mobilefacenet-onnx`` (the same model
converted by tf2onnx at the start, run by onnxruntime), ``resnet18`` (synthetic). Each round
runs every teacher's variants in turn, so the teachers are measured side by side.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/NAME.py` from anywhere

from bench.common import (  # noqa: E402
    MOBILEFACENET,
    add_idle_args,
    distill_cmd,
    loadavg,
    make_face_jpegs,
    print_header,
    run_child,
    settle,
    table,
    this_script_cmd,
)
from bench.projection import median, steady_cpu_per_row, steady_rate  # noqa: E402

WARMUP_CALLS = 3  # teacher calls before the clock starts in (b) and (d); (a) leaves out its first shard
VARIANTS = ("d", "a", "b", "c", "a0", "a15", "d0", "a1", "a2")
RATIOS = (("a", "d"), ("a", "b"), ("a", "c"), ("a0", "d"), ("a", "a0"), ("a15", "a"), ("d", "d0"), ("a1", "a"), ("a2", "a"))
CPU_SAMPLE_S = 0.25
LABELS = {
    "a": "(a) distill embed (CLI, local Ray, file ledger)",
    "a15": "(a15) as (a), Ray's default worker niceness 15",
    "a1": "(a1) as (a), 1 decode thread ((a): the default, the actor's CPUs but at least 4)",
    "a2": "(a2) as (a), 2 decode threads",
    "a0": "(a0) EmbedWorker.embed_shard, no Ray",
    "b": "(b) per-image loop, batch of 1",
    "c": "(c) Ray Data map_batches + actor pool -> Parquet",
    "d": "(d) teacher alone, preprocessed in memory",
    "d0": "(d0) teacher alone, TF default threading",
}


# ---------------------------------------------------------------------------- children

def _paths(listing: str) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(listing, columns=["path"]).column("path").to_pylist()


def _setup_tf(threads: int | None) -> None:
    # The embed actor's own TF settings (determinism, intra-op threads, one inter-op thread),
    # so (b), (c), (d) differ from (a) only in the pipeline around the teacher.
    from distill.workers.embed_actor import _configure_tensorflow

    _configure_tensorflow(threads)


def _spec(teacher: str):
    from distill.teacher import inspect_teacher

    return inspect_teacher(os.path.abspath(teacher))


def _teacher(spec, threads: int | None):
    """The runnable teacher as the embed actor makes it (its TF settings first, for a SavedModel)."""
    from distill.teacher import Preprocessing, load_teacher

    if spec.format == "savedmodel":
        _setup_tf(threads)
    return load_teacher(spec, Preprocessing(), threads)


def child_ceiling(a) -> dict:
    """(d): the model called on float32 batches already preprocessed (SavedModel: tensors, its
    signature called directly; ONNX: arrays, the session's run). (d0): the runtime's default
    threading."""
    import numpy as np

    from distill.images import prepare
    from distill.teacher import Preprocessing

    spec = _spec(a.teacher)
    threads = a.threads if a.variant == "d" else None
    pre = Preprocessing()
    paths = _paths(a.listing)
    pixels = np.stack([prepare(open(p, "rb").read(), spec.height, spec.width)[0] for p in paths])
    batches = [pre.apply(pixels[i:i + a.batch_size]) for i in range(0, len(paths), a.batch_size)]
    if spec.format == "onnx":
        teacher = _teacher(spec, threads)
        call = teacher.embed
    else:
        import tensorflow as tf

        if threads:
            _setup_tf(threads)
        batches = [tf.constant(x) for x in batches]
        model = tf.saved_model.load(spec.path)
        fn = model.signatures[spec.signature]
        call = lambda x: fn(**{spec.input_name: x})[spec.output_name].numpy()  # noqa: E731
    for x in batches[:WARMUP_CALLS]:  # warm-up: tracing, kernels' primitives, allocator
        call(x)
    events = [(time.time(), 0)]
    for x in batches:
        call(x)
        events.append((time.time(), int(x.shape[0])))
    return {"rows": len(paths), "events": events}


def child_per_image(a) -> dict:
    """(b): the loop of the original notes."""
    import numpy as np
    from PIL import Image

    spec = _spec(a.teacher)
    teacher = _teacher(spec, a.threads)
    for _ in range(WARMUP_CALLS):
        teacher(np.zeros((1, spec.height, spec.width, 3), np.uint8))
    embs, events = [], []
    for p in _paths(a.listing):
        img = np.asarray(Image.open(p).convert("RGB").resize((spec.width, spec.height)))
        embs.append(teacher(img[None])[0])
        events.append((time.time(), 1))
    np.save(os.path.join(a.out, "embeddings.npy"), np.stack(embs))
    return {"rows": len(embs), "events": events}


def child_worker(a) -> dict:
    """(a0): the embed actor's class driven in this process, shard by shard, no Ray."""
    from distill.embed.listing import ListingReader, listing_fingerprint
    from distill.shards.plan import plan_shards
    from distill.teacher import Preprocessing
    from distill.workers.embed_actor import EmbedTask, EmbedWorker

    spec = _spec(a.teacher)
    if spec.format == "savedmodel":
        _setup_tf(a.threads)  # before anything starts TF: thread settings are fixed at its first use
    task = EmbedTask(teacher=spec, pre=Preprocessing(), out=a.out, run_id=listing_fingerprint(a.listing)[:16],
                     batch_size=a.batch_size, flip=False, threads=a.threads, decode_threads=4)
    worker = EmbedWorker(task)
    reader = ListingReader(a.listing)
    events = []
    for shard in plan_shards(reader.num_rows, a.shard_size):
        for item in worker.embed_shard(shard, reader.rows(shard.start, shard.stop)):
            if isinstance(item, int):
                events.append((time.time(), item))
    return {"rows": reader.num_rows, "events": events}


def child_ray_data(a) -> dict:
    """(c): the Ray Data batch-inference pipeline a user would write first."""
    import logging

    import numpy as np
    import ray

    from distill.images import prepare

    spec = _spec(a.teacher)
    paths = _paths(a.listing)
    ev_dir = tempfile.mkdtemp(prefix="raydata-events-")
    threads, batch_size = a.threads, a.batch_size
    t_init = time.time()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False

    def decode(batch):
        px, stored = zip(*(prepare(bytes(b), spec.height, spec.width) for b in batch["bytes"]))
        return {"path": batch["path"], "pixels": np.stack(px), "image": np.array(stored, dtype=object)}

    class Embed:
        def __init__(self):
            self.teacher = _teacher(spec, threads)
            self.log = open(os.path.join(ev_dir, f"{os.getpid()}.events"), "a")

        def __call__(self, batch):
            emb = self.teacher(batch["pixels"])
            self.log.write(f"{time.time()} {len(emb)}\n")
            self.log.flush()
            return {"path": batch["path"], "embedding": emb, "image": batch["image"]}

    t0 = time.time()
    (
        ray.data.read_binary_files(paths, include_paths=True)
        .map_batches(decode, batch_size=batch_size)
        .map_batches(Embed, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=a.ray_data_actors),
                     num_cpus=a.ray_data_actor_cpus)
        .write_parquet(os.path.join(a.out, "parquet"))
    )
    t1 = time.time()
    ray.shutdown()
    events = []
    for f in glob.glob(os.path.join(ev_dir, "*.events")):
        with open(f) as fh:
            events += [(float(t), int(n)) for t, n in (line.split() for line in fh)]
    shutil.rmtree(ev_dir, ignore_errors=True)
    rows = sum(n for _, n in events)
    if rows != len(paths):
        raise RuntimeError(f"Ray Data embedded {rows} rows, expected {len(paths)}")
    return {"rows": rows, "events": events, "pipeline_s": t1 - t0, "ray_init_s": t0 - t_init}


def child_build_resnet(a) -> dict:
    from bench.common import build_resnet18_teacher

    build_resnet18_teacher(Path(a.out))
    return {"teacher": a.out}


CHILDREN = {"d": child_ceiling, "d0": child_ceiling, "b": child_per_image, "a0": child_worker, "c": child_ray_data,
            "build-resnet": child_build_resnet}


# ---------------------------------------------------------------------------- the run

def run_cli_embed(listing: str, teacher: str, out: Path, a, env: dict, *extra) -> dict:
    """(a): the real CLI in its own process; steady state from the ledger's done records."""
    shutil.rmtree(out, ignore_errors=True)
    res = run_child(distill_cmd("embed", listing, "--teacher", teacher, "--out", out, "--batch-size", a.batch_size,
                                "--shard-size", a.shard_size, "--no-flip", "--no-progress", *extra),
                    env=env, sample_cpu=CPU_SAMPLE_S)
    events = []
    for f in glob.glob(str(out / "_ledger" / "*.done")):
        with open(f) as fh:
            rec = json.load(fh)
        events.append((rec["finished_at"], rec["rows"]))
    m = re.search(r"this run: (\d+) rows in ([\d.]+)s", res.stdout)
    return {"rows": int(m.group(1)), "events": events, "wall_s": res.seconds, "rss_mib": res.peak_rss_mib,
            "cli_s": float(m.group(2)), "cpu": res.cpu_series}


def run_variant(v: str, listing: str, teacher: str, work: Path, a) -> dict:
    out = work / f"out-{v}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    load = settle(a, f"variant {v}").label()
    # Ray starts its workers at niceness 15; on a machine shared with other work that starves
    # them. Equal footing for the comparison: niceness 0 like every other variant, except in
    # (a15), which shows Ray's default.
    env = {"RAY_ADDRESS": "local", "RAY_worker_niceness": "15" if v == "a15" else "0"}
    if v in ("a", "a15", "a1", "a2"):
        r = run_cli_embed(listing, teacher, out, a, env, *(("--decode-threads", v[1]) if v in ("a1", "a2") else ()))
    else:
        res = run_child(this_script_cmd("teacher_pass.py", "--child", v, "--teacher", teacher, "--listing", listing,
                                        "--out", out, "--batch-size", a.batch_size, "--shard-size", a.shard_size,
                                        "--threads", a.threads, "--ray-data-actors", a.ray_data_actors,
                                        "--ray-data-actor-cpus", a.ray_data_actor_cpus),
                        env=env, sample_cpu=CPU_SAMPLE_S)
        r = {**res.json(), "wall_s": res.seconds, "rss_mib": res.peak_rss_mib, "cpu": res.cpu_series}
    # (a)'s events are shards (its first shard is the warm-up); the others' are batches or images.
    skip = 0 if v in ("a", "a15", "a1", "a2", "d", "d0", "b") else WARMUP_CALLS - 1
    r["steady"] = steady_rate(r["events"], skip=skip)
    r["cpu_ms"] = 1000 * steady_cpu_per_row(r["events"], r["cpu"], skip=skip)
    r["load"] = load
    shutil.rmtree(out, ignore_errors=True)
    print(f"  {v:>3}: {r['steady']:7.1f} img/s steady, {r['cpu_ms']:6.1f} CPU ms/img, {r['rows']} rows, "
          f"wall {r['wall_s']:.1f} s, load {load}", file=sys.stderr, flush=True)
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--teachers", default="mobilefacenet,resnet18",
                   help="comma list of mobilefacenet, mobilefacenet-onnx, resnet18")
    p.add_argument("--variants", default="d,a,b,c",
                   help=f"any of {','.join(VARIANTS)} (a0, a15, a1, a2, d0 are diagnostics), run in this order each round")
    p.add_argument("--rounds", type=int, default=1, help="repeat every variant (interleaved); medians are reported")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="TF intra-op threads (the CLI's default: all CPUs)")
    p.add_argument("--ray-data-actors", type=int, default=1)
    p.add_argument("--ray-data-actor-cpus", type=float, default=1.0,
                   help="CPUs reserved per Ray Data actor (1 leaves a CPU for its read/decode tasks)")
    p.add_argument("--work", default=None, help="scratch dir (default: a temp dir, removed)")
    # child mode
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--teacher", help=argparse.SUPPRESS)
    p.add_argument("--listing", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    add_idle_args(p)
    a = p.parse_args(argv)
    if a.child:
        a.variant = a.child
        print(json.dumps(CHILDREN[a.child](a)))
        return 0

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-teacher-"))
    work.mkdir(parents=True, exist_ok=True)
    print_header("Teacher pass throughput")
    images = make_face_jpegs(work / "images", a.images)
    listing = str(work / "listing.parquet")
    run_child(distill_cmd("listing", images, "--out", listing))
    teachers = {}
    for name in a.teachers.split(","):
        if name == "mobilefacenet":
            teachers[name] = str(MOBILEFACENET)
        elif name == "mobilefacenet-onnx":  # the same model as ONNX, converted as `distill export --onnx` does
            path = work / "mobilefacenet.onnx"
            run_child([sys.executable, "-m", "tf2onnx.convert", "--saved-model", MOBILEFACENET, "--opset", "17",
                       "--output", path])
            teachers[name] = str(path)
        elif name == "resnet18":
            path = work / "resnet18"
            run_child(this_script_cmd("teacher_pass.py", "--child", "build-resnet", "--out", path))
            teachers[name] = str(path)
        else:
            raise ValueError(f"unknown teacher {name!r}: use mobilefacenet, mobilefacenet-onnx, resnet18")
    variants = a.variants.split(",")
    print(f"{a.images} JPEGs 112x112 RGB (ORL faces resized, tinted copies), batch {a.batch_size}, "
          f"shard {a.shard_size}, --no-flip everywhere, TF intra-op threads {a.threads}, "
          f"Ray Data: {a.ray_data_actors} actor(s) x {a.ray_data_actor_cpus:g} CPU, rounds {a.rounds}\n")

    runs_of: dict[str, dict[str, list[dict]]] = {t: {v: [] for v in variants} for t in teachers}
    for _ in range(a.rounds):  # every teacher in each round: side by side, under the same conditions
        for tname, tpath in teachers.items():
            print(f"teacher {tname}", file=sys.stderr, flush=True)
            for v in variants:
                runs_of[tname][v].append(run_variant(v, listing, tpath, work, a))
    for tname, runs in runs_of.items():
        rows = []
        for v in variants:
            rs = runs[v]
            wall = median([x["wall_s"] for x in rs])
            extra = ""
            if v == "c":
                extra = f"pipeline {median([x['pipeline_s'] for x in rs]):.1f} s + ray.init {median([x['ray_init_s'] for x in rs]):.1f} s"
            if v in ("a", "a15", "a1", "a2"):
                extra = f"CLI's own figure {median([x['rows'] / x['cli_s'] for x in rs]):.1f} img/s"
            rows.append([LABELS[v], f"{median([x['steady'] for x in rs]):.1f}", f"{median([x['cpu_ms'] for x in rs]):.1f}",
                         f"{rs[0]['rows'] / wall:.1f}", f"{wall:.1f}", f"{median([x['rss_mib'] for x in rs]):.0f}",
                         "; ".join(x["load"] for x in rs), extra])
        print(f"### {tname}\n")
        print(table(["variant", "steady img/s", "CPU ms/img (process tree)", "img/s incl. start-up", "wall s",
                     "peak RSS MiB (child)", "load avg at start", "note"], rows))
        print()
        ratios = []
        for num, den in RATIOS:
            if num in runs and den in runs:
                per_round = [x["steady"] / y["steady"] for x, y in zip(runs[num], runs[den])]
                cpu = [y["cpu_ms"] / x["cpu_ms"] for x, y in zip(runs[num], runs[den])]
                spread = f" ({min(per_round):.2f}-{max(per_round):.2f})" if len(per_round) > 1 else ""
                ratios.append([f"{num}/{den}", f"{median(per_round):.2f}{spread}", f"{median(cpu):.2f}"])
        print(table(["ratio", "steady img/s, median of rounds (range)", "CPU efficiency (den CPU/img / num CPU/img)"],
                    ratios))
        print()
    if {"mobilefacenet", "mobilefacenet-onnx"} <= set(runs_of):
        sm, ox = runs_of["mobilefacenet"], runs_of["mobilefacenet-onnx"]
        rows = []
        for v in variants:
            steady = [o["steady"] / t["steady"] for o, t in zip(ox[v], sm[v])]
            wall = [t["wall_s"] / o["wall_s"] for o, t in zip(ox[v], sm[v])]
            rows.append([LABELS[v], f"{median(steady):.2f} ({min(steady):.2f}-{max(steady):.2f})",
                         f"{median(wall):.2f} ({min(wall):.2f}-{max(wall):.2f})"])
        print("### ONNX against SavedModel, same model, same images, same round\n")
        print(table(["variant", "steady img/s, ONNX / SavedModel (range of rounds)",
                     "whole process, SavedModel wall / ONNX wall (range)"], rows))
        print()
    print(f"load average at the end: {loadavg()}")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
