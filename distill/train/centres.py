"""Teacher class centres for the ``teacher`` margin head, and the one pass over the shards
that the trainer makes before its first step.

The ``teacher`` head is the AdaDistill / ArcDistill idea: an ArcFace classifier whose class
weights are not learned but are the teacher's class centres, so the margin loss pulls each
student embedding towards where the *teacher* puts that identity. ``scan_shards`` reads the
``label`` (and, for centres, ``embedding``) columns of every shard once, streaming, and
returns every sample's label and each class's mean normalised teacher embedding. During
training the centres stay fixed (``fixed``) or follow AdaDistill's rule (``adaptive``):
after each step, without gradients, for every sample i of class y

    alpha_i = clip(cos(student_i, teacher_i) * cos(centre_y, teacher_i), 1e-6, 1)
    centre_y <- mean over the batch's samples of class y of (alpha_i centre_y + (1 - alpha_i) teacher_i)

(teacher_i normalised): while the student still disagrees with the teacher, the centre moves
to the teacher's own embeddings of the batch; once both agree it stays.
``adaptive_update`` is the NumPy statement of that rule; the trainer runs the same rule in
TensorFlow and the tests hold the two equal.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from distill.errors import BadInput
from distill.shards.format import UNLABELLED

log = logging.getLogger(__name__)

CENTRE_UPDATES = ("fixed", "adaptive")
SCAN_CACHE = "shard-scan.npz"


@dataclass(frozen=True)
class ShardScan:
    """Every sample's label (by sample id), and per class the sum of normalised teacher
    embeddings and the row count (None when centres were not asked for)."""

    labels: np.ndarray  # int64 [N]
    sums: np.ndarray | None  # float64 [C, D]
    counts: np.ndarray  # int64 [C]

    def centres(self, exclude_classes: np.ndarray | None = None) -> np.ndarray:
        """float32 [C, D] unit centres; classes with no rows (or excluded) are zero."""
        if self.sums is None:
            raise ValueError("this scan read no embeddings; scan with centres=True")
        sums = self.sums.copy()
        if exclude_classes is not None and len(exclude_classes):
            sums[np.asarray(exclude_classes, np.int64)] = 0.0
        norm = np.linalg.norm(sums, axis=1, keepdims=True)
        return np.where(norm > 0, sums / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def accumulate(sums: np.ndarray, counts: np.ndarray, labels: np.ndarray, embeddings: np.ndarray) -> None:
    """Add one batch of rows into the per-class sums of normalised embeddings. In place."""
    labels = np.asarray(labels, np.int64)
    np.add.at(sums, labels, unit(embeddings))
    np.add.at(counts, labels, 1)


def scan_shards(shards, centres: bool, cache_dir: str | None = None) -> ShardScan:
    """One streaming pass over the shards (columns ``label``[, ``embedding``]), cached by run id."""
    from tqdm import tqdm

    from distill.shards.reader import ShardReader, embeddings

    cache = os.path.join(cache_dir, SCAN_CACHE) if cache_dir else None
    if cache and os.path.exists(cache):
        with np.load(cache) as z:
            if str(z["run_id"]) == shards.run_id and (not centres or "sums" in z.files):
                return ShardScan(z["labels"], z["sums"] if "sums" in z.files else None, z["counts"])
    labels = np.empty(shards.total_rows, np.int64)
    sums = np.zeros((shards.num_classes, shards.embedding_dim), np.float64) if centres else None
    counts = np.zeros(shards.num_classes, np.int64)
    at = 0
    with tqdm(total=len(shards.names), desc="scan shards", unit="shard", leave=False,
              disable=len(shards.names) < 50) as bar:
        for k, _, t in ShardReader(shards).scan(["label", "embedding"] if centres else ["label"], bar.update):
            lab = t.column("label").to_numpy()
            if len(lab) and (lab.min() < UNLABELLED or lab.max() >= shards.num_classes):
                raise BadInput(f"{shards.location}/{shards.names[k]} has labels outside 0..{shards.num_classes - 1} "
                               "(and -1: unlabelled); the shard directory does not match its manifest: rerun "
                               "`distill embed`")
            labels[at:at + len(lab)] = lab
            at += len(lab)
            known = lab >= 0  # unlabelled rows belong to no class
            if centres:
                accumulate(sums, counts, lab[known], embeddings(t.column("embedding"), shards.embedding_dim)[known])
            else:
                np.add.at(counts, lab[known], 1)
    if at != shards.total_rows:
        raise BadInput(f"the shards in {shards.location} hold {at} rows, the manifest says {shards.total_rows}; "
                         "rerun `distill embed`")
    scan = ShardScan(labels, sums, counts)
    if cache:
        import io

        from distill.storage import write_file_atomic

        os.makedirs(cache_dir, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, run_id=np.array(shards.run_id), labels=labels, counts=counts, **({"sums": sums} if centres else {}))
        write_file_atomic(cache, buf.getvalue(), durable=False)
    return scan


def adaptive_update(centres: np.ndarray, student: np.ndarray, teacher: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AdaDistill's centre rule for one batch (see the module docstring); unlabelled rows
    (label -1) move no centre. Pure; [C, D] in and out."""
    c = np.asarray(centres, np.float64)
    labels = np.asarray(labels, np.int64)
    known = labels >= 0
    s, t, labels = unit(np.asarray(student)[known]), unit(np.asarray(teacher)[known]), labels[known]
    alpha = np.clip(np.sum(s * t, 1) * np.sum(unit(c[labels]) * t, 1), 1e-6, 1.0)
    moved = alpha[:, None] * c[labels] + (1 - alpha[:, None]) * t
    out = c.copy()
    for y in np.unique(labels):
        out[y] = moved[labels == y].mean(axis=0)
    return out


def adaptive_update_tf(centres, student, teacher, labels):
    """The same rule in TensorFlow on [D, C] centres (the classifier's layout); returns new centres."""
    import tensorflow as tf

    known = labels >= 0  # unlabelled rows move no centre
    student, teacher, labels = (tf.boolean_mask(x, known) for x in (student, teacher, labels))
    c = tf.transpose(centres)  # [C, D]
    s = tf.math.l2_normalize(tf.cast(student, tf.float32), -1)
    t = tf.math.l2_normalize(tf.cast(teacher, tf.float32), -1)
    cy = tf.gather(c, labels)
    alpha = tf.clip_by_value(tf.reduce_sum(s * t, -1) * tf.reduce_sum(tf.math.l2_normalize(cy, -1) * t, -1), 1e-6, 1.0)
    moved = alpha[:, None] * cy + (1.0 - alpha[:, None]) * t
    classes, slot = tf.unique(labels)
    mean = tf.math.unsorted_segment_mean(moved, slot, tf.shape(classes)[0])
    return tf.transpose(tf.tensor_scatter_nd_update(c, classes[:, None], mean))
