"""The student's training step after the trainer's input source has run: ``from_generator``
against the chunk source ``distill.train.stream`` uses now (a ``numpy_function`` repeated until
an empty chunk).

In one child process per variant: the source is iterated over real shards (one epoch of the
trainer's own plan), then the student's compiled step (MobileFaceNet at 64 px, 192-d, batch
64, Adam, nMSE) runs ``--steps`` times on one batch held in memory, so only the step is timed,
with the process's minor page faults and system CPU over those steps. ``none`` runs no source
first. Variants alternate round by round; figures are medians over the rounds.

    python bench/stream_source.py SHARDS [--rounds 3] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_idle_args, print_header, run_child, settle, table, this_script_cmd  # noqa: E402

VARIANTS = ("none", "from_generator", "chunk source (distill)")


def child(shards_dir: str, variant: str, steps: int) -> dict:
    import resource

    import numpy as np
    import tensorflow as tf

    from distill.shards.reader import open_shards
    from distill.train.order import plan_epoch
    from distill.train.stream import iter_samples, make_dataset
    from distill.train.student import StudentSpec, build_student

    batch = 64
    shards = open_shards(shards_dir)
    plan = plan_epoch(list(shards.rows), seed=0, epoch=0, world_size=1, rank=0, buffer=8192, global_batch=batch)
    if variant == "chunk source (distill)":
        sum(1 for _ in make_dataset(shards, plan, seed=0, flip=True, replica_batch=batch))
    elif variant == "from_generator":
        first = next(iter_samples(shards, plan, seed=0, flip=True, view_prob=0.0, chunk=256))
        spec = {k: tf.TensorSpec([None, *np.asarray(v).shape[1:]], tf.as_dtype(np.asarray(v).dtype))
                for k, v in first.items()}
        ds = tf.data.Dataset.from_generator(
            lambda: iter_samples(shards, plan, seed=0, flip=True, view_prob=0.0, chunk=256), output_signature=spec)
        sum(1 for _ in ds.unbatch())
    model = build_student(StudentSpec(shards.input_size, shards.embedding_dim, 0, arch="mobilefacenet", resolution=64))
    opt = tf.keras.optimizers.Adam(1e-3)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            e = model(x, training=True)["embedding"]
            loss = tf.reduce_mean(tf.square(tf.math.l2_normalize(e, 1) - tf.math.l2_normalize(y, 1)))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients([(g, v) for g, v in zip(grads, model.trainable_variables) if g is not None])
        return loss

    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 256, (batch, *shards.input_size, 3)).astype(np.uint8))
    y = tf.constant(rng.standard_normal((batch, shards.embedding_dim)).astype(np.float32))
    step(x, y), step(x, y)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step(x, y).numpy()
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"images_per_second": steps * batch / seconds, "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
            "sys_s_per_step": (r1.ru_stime - r0.ru_stime) / steps, "user_s_per_step": (r1.ru_utime - r0.ru_utime) / steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shards")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    add_idle_args(p)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.shards, a.child, a.steps)))
        return
    print_header("The student's step after the input source ran: from_generator against the chunk source")
    got: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    loads = []
    for _ in range(a.rounds):
        for v in VARIANTS:
            loads.append(settle(a, v).label())
            got[v].append(run_child(this_script_cmd("stream_source.py", a.shards, "--steps", a.steps, "--child", v)).json())
    rows = []
    for v in VARIANTS:
        med = {k: statistics.median(r[k] for r in got[v]) for k in got[v][0]}
        rows.append([v, med["images_per_second"], med["minor_faults_per_step"], med["sys_s_per_step"],
                     med["user_s_per_step"], " / ".join(f"{r['images_per_second']:.0f}" for r in got[v])])
    print(table(["source run first", "step img/s (median)", "minor page faults per step", "system CPU s per step",
                 "user CPU s per step", "img/s by round"], rows))
    print(f"\nLoad before each variant: {'; '.join(loads)}")


if __name__ == "__main__":
    main()
