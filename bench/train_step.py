"""What each term of the objective costs per training step, at the emore class count.

The loop's own compiled step (``distill.train.loop._make_step``: forward, named loss parts,
gradients, Adam) of the student (MobileNetV2 x0.5, 512-d, batch 64, 112x112) on batches held
in memory, so only the step is timed, for:

- ``nMSE`` (the previous defaults),
- ``nMSE + contrast`` (the defaults),
- the same with the classifier computed at a negligible weight (``--ce-weight 1e-9``):
  what every step cost before a term with weight 0 was skipped (the classifier's forward and
  backward ran whatever its weight),
- ``nMSE + contrast + softmax 1`` (a recipe that trains the classifier),

each with 85,742 classes (emore) and 8. Variants alternate round by round in one process so
other load hits them alike; the figure is the median step time.

    python bench/train_step.py [--rounds 5] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_idle_args, loadavg, print_header, settle, table  # noqa: E402

EMORE_CLASSES = 85742
VARIANTS = {  # name -> (ce_weight, distill_weight, contrast_weight)
    "nMSE (previous defaults)": (0.0, 1.0, 0.0),
    "nMSE + contrast (defaults)": (0.0, 1.0, 1.0),
    "nMSE + contrast, classifier computed at weight 1e-9 (before: every step)": (1e-9, 1.0, 1.0),
    "nMSE + contrast + softmax 1": (1.0, 1.0, 1.0),
}


def build(classes: int, weights: tuple[float, float, float], batch: int, dim: int, width: float):
    import keras
    import tensorflow as tf

    from distill.train.loop import _make_step
    from distill.train.losses import LossSpec
    from distill.train.student import StudentSpec, build_student

    model = build_student(StudentSpec((112, 112), dim, classes, width=width))
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    ce, mse, con = weights
    spec = LossSpec(ce_weight=ce, distill_weight=mse, distill="nmse", contrast_weight=con)
    step = _make_step(model, optimizer, tf.distribute.get_strategy(), spec, batch, False)
    return step, model.count_params()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant per round")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--width", type=float, default=0.5)
    add_idle_args(ap)
    a = ap.parse_args()
    print_header("Training step cost by objective term and class count")
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    batches = {}
    for classes in (EMORE_CLASSES, 8):
        batches[classes] = {
            "image": tf.constant(rng.normal(size=(a.batch_size, 112, 112, 3)).astype(np.float32)),
            "target": tf.constant(rng.normal(size=(a.batch_size, a.dim)).astype(np.float32)),
            "label": tf.constant(rng.integers(0, classes, a.batch_size), tf.int64),
            "index": tf.constant(np.arange(a.batch_size), tf.int64),
        }
    steps, params = {}, {}
    for classes in (EMORE_CLASSES, 8):
        for name, w in VARIANTS.items():
            steps[(classes, name)], params[(classes, name)] = build(classes, w, a.batch_size, a.dim, a.width)
    go_on = tf.constant(0.0)
    for key, fn in steps.items():  # compile and warm up
        for _ in range(2):
            float(fn(batches[key[0]], go_on)[0]["loss"])
    print(f"load before the rounds: {settle(a, 'the rounds').label()}")
    times: dict[tuple, list[float]] = {k: [] for k in steps}
    for _ in range(a.rounds):
        for key, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                float(fn(batches[key[0]], go_on)[0]["loss"])  # the loop reads the losses every step
            times[key].append((time.perf_counter() - t0) / a.steps)
    rows = []
    for (classes, name), ts in times.items():
        base = statistics.median(times[(classes, "nMSE (previous defaults)")])
        med = statistics.median(ts)
        rows.append([f"{classes:,}", name, f"{params[(classes, name)]:,}", f"{med * 1000:.0f}",
                     f"{min(ts) * 1000:.0f}-{max(ts) * 1000:.0f}", f"{med / base:.2f}"])
    print(f"\nstudent MobileNetV2 x{a.width}, {a.dim}-d, batch {a.batch_size}, 112x112; {a.rounds} rounds x "
          f"{a.steps} steps per variant, interleaved; median ms per step\n")
    print(table(["classes", "objective", "parameters", "ms / step", "range", "vs nMSE"], rows))
    print(f"\nload average at the end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
