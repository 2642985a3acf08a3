"""Validation while training: how the student does on people it does not train on.

Two sources, chosen by ``distill train``:

- ``--val-split F``: a seeded fraction of the identities in the shards is held out
  (``heldout_classes``). Their rows leave the training order (and the classifier: their
  classes are masked out of the softmax, so they are not even negatives); up to
  ``--val-images`` of them (``pick_samples``) are read once, with the teacher's embeddings
  the shards already hold.
- ``--val-folders DIR``: an identity folder tree of other people, embedded once at start by
  the teacher the shards were made with (its path, signature and preprocessing come from the
  manifest; if it is not on this machine only the verification figures are scored).

- ``--val-bin lfw.bin,...``: insightface verification sets, beside either, scored as
  insightface scores them (``score_bin``: 10-fold accuracy of the flip-summed embeddings).

At every epoch end (and every ``--val-every`` steps) ``score`` gives the mean teacher-student
cosine and the verification ROC-AUC and 10-fold accuracy over distinct same/different pairs
of the held-out images (the ``distill evaluate`` functions), and ``score_bin`` each set's figures;
``--best-by`` names the one that chooses ``OUT/best``. Everything that decides is pure NumPy, tested without
TensorFlow. Hands on: ``ValSet`` to the loop, ``score``'s dict to metrics.jsonl and the
progress bar; the best epoch's checkpoint is kept in ``OUT/best``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from distill.errors import BadInput, BadOption

log = logging.getLogger(__name__)

ALL_PAIRS_MAX = 2000  # above this many images, a seeded sample of pairs
SAMPLED_PAIRS = 20000


@dataclass(frozen=True)
class ValSet:
    source: str  # what it is, for logs
    images: np.ndarray  # uint8 [n, H, W, 3]: the pixels the student is scored on
    labels: np.ndarray  # int64 [n]
    teacher: np.ndarray | None  # raw teacher embeddings [n, D], when known
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray]  # (i, j, same)


@dataclass(frozen=True)
class BinSet:
    """An insightface verification set: images 2k and 2k+1 are pair k."""

    name: str  # lfw.bin: "lfw"; its figures are val_<name>_acc, val_<name>_auc
    images: np.ndarray  # uint8 [2n, H, W, 3]
    same: np.ndarray  # bool [n]


# ---------------------------------------------------------------------------------------
# Pure decisions.


def heldout_classes(counts: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted class ids to hold out: a seeded ``fraction`` of the classes that have at least
    two rows (verification needs same-identity pairs), at least two classes, and never all.
    ``counts`` are rows per class: unlabelled rows (label -1) have no class and never count."""
    present = np.flatnonzero(np.asarray(counts) >= 2)
    if fraction <= 0:
        return np.zeros(0, np.int64)
    if len(present) < 2:
        raise BadOption(
            f"--val-split holds out labelled identities with two or more images, and the shards have {len(present)} "
            "(rows of no known identity are never held out); validate on other people with --val-folders DIR")
    n = max(2, int(round(fraction * len(present))))
    if n >= len(np.flatnonzero(np.asarray(counts) > 0)):
        raise BadOption(
            f"--val-split {fraction} would hold out {n} of the {len(present)} identities with 2+ images and leave "
            "nothing to train on; lower --val-split, or validate on other people with --val-folders DIR"
        )
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x7A1])))
    return np.sort(rng.choice(present, size=n, replace=False)).astype(np.int64)


def pick_samples(sample_labels: np.ndarray, heldout: np.ndarray, max_images: int, seed: int) -> np.ndarray:
    """Sorted sample ids to validate on: all held-out rows, or a seeded subset of
    ``max_images`` of them taken evenly across the held-out classes (so each has pairs)."""
    rows = np.flatnonzero(np.isin(sample_labels, heldout))
    if len(rows) <= max_images:
        return rows
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x7A2])))
    by_class = [rng.permutation(rows[sample_labels[rows] == c]) for c in heldout]
    # Round-robin over the classes, so small identities are not crowded out by big ones.
    order = [b[k] for k in range(max(len(b) for b in by_class)) for b in by_class if k < len(b)]
    return np.sort(np.asarray(order[:max_images], np.int64))


def pairs_for(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from distill.metrics import all_pairs, sample_pairs

    if len(labels) <= ALL_PAIRS_MAX:
        i, j, same = all_pairs(labels)
    else:
        i, j, same = sample_pairs(labels, SAMPLED_PAIRS, seed)
    if same.all() or not same.any():
        raise BadInput("the validation images need at least two identities and one identity with two images")
    return i, j, same


def score(student: np.ndarray, val: ValSet, fold_seed: int = 0) -> dict[str, float]:
    """Verification ROC-AUC and accuracy (10 folds of the shuffled pairs, the threshold chosen on
    the other nine: ``distill evaluate``'s) of the student's embeddings over the pairs, and the
    mean teacher-student cosine when the teacher's embeddings are known. The folds are the same
    at every validation. Pure."""
    from distill.metrics import fold_accuracy, l2_normalise, mean_cosine, roc_auc

    e = l2_normalise(student)
    i, j, same = val.pairs
    scores = np.sum(e[i] * e[j], axis=1)
    accs, _ = fold_accuracy(scores, same, fold_seed)
    out = {"val_auc": roc_auc(scores, same), "val_accuracy": float(accs.mean())}
    if val.teacher is not None and val.teacher.shape[1] == student.shape[1]:
        out["val_cos"] = mean_cosine(student, val.teacher)
    return out


def score_bin(embedding: np.ndarray, flipped: np.ndarray, val: BinSet) -> dict[str, float]:
    """insightface's figures for a verification set: each image's embedding is the sum of its
    own and its mirror's, L2-normalised; pairs by squared distance; the 10-fold accuracy
    (mean) and the ROC-AUC. Pure."""
    from distill.metrics import kfold_accuracy, l2_normalise, roc_auc

    e = l2_normalise(embedding + flipped)
    dist = np.sum((e[0::2] - e[1::2]) ** 2, axis=1)
    accs, _ = kfold_accuracy(dist, val.same)
    return {f"val_{val.name}_acc": float(accs.mean()), f"val_{val.name}_auc": roc_auc(-dist, val.same)}


def is_better(new: dict[str, float], best: dict[str, float] | None, key: str = "val_auc") -> bool:
    """The best validation is the one highest on ``key`` (``--best-by``; the held-out cosine
    breaks ties). A best kept by another key, or none, is beaten."""
    if best is None or key not in best:
        return True
    return (new[key], new.get("val_cos", 0.0)) > (best[key], best.get("val_cos", 0.0))


# ---------------------------------------------------------------------------------------
# Loading.


def from_shards(shards, sample_ids: np.ndarray, seed: int) -> ValSet:
    """The held-out rows' stored pixels (decoded as the teacher saw them) and plain embeddings."""
    from distill.images import decode_rgb
    from distill.shards.reader import ShardReader, embeddings

    t = ShardReader(shards).read_rows(np.sort(sample_ids), ["label", "embedding", "image"])
    lab = t.column("label").to_numpy()
    images = np.stack([decode_rgb(b) for b in t.column("image").to_pylist()])
    return ValSet(f"{len(lab)} held-out images of {len(np.unique(lab))} identities", images, lab,
                  embeddings(t.column("embedding"), shards.embedding_dim), pairs_for(lab, seed))


def from_folders(root: str, shards, max_images: int, seed: int) -> ValSet:
    """An identity folder tree, resized to the student's input; teacher embeddings from the
    shards' own teacher when it is on this machine."""
    from distill.heldout import scan_folders
    from distill.images import UnreadableImage, decode_rgb, fit, read_file

    paths, labels, names = scan_folders(root)
    keep = pick_samples(labels, np.unique(labels), max_images, seed)
    h, w = shards.input_size
    images, kept = [], []
    for k in keep.tolist():
        try:
            images.append(fit(decode_rgb(read_file(paths[k])), h, w))
            kept.append(k)
        except UnreadableImage as e:
            log.warning("--val-folders: skipping %s: %s", paths[k], e.reason)
    lab = labels[np.asarray(kept, np.int64)]
    pixels = np.stack(images)
    return ValSet(f"{len(lab)} images of {len(np.unique(lab))} identities in {root}", pixels, lab,
                  _teacher_embeddings(shards, pixels), pairs_for(lab, seed))


def from_bin(name: str, path: str, input_size: tuple[int, int]) -> BinSet:
    """A .bin (through ``distill evaluate``'s restricted unpickler), decoded and fitted to the
    student's input; every image must decode, as the protocol needs every pair."""
    from distill.heldout import load_bin
    from distill.images import UnreadableImage, decode_rgb, fit

    blobs, same = load_bin(path)
    h, w = input_size
    try:
        images = np.stack([fit(decode_rgb(b), h, w) for b in blobs])
    except UnreadableImage as e:
        raise BadInput(f"--val-bin {path}: an image cannot be decoded ({e.reason}); the protocol needs every pair") from None
    return BinSet(name, images, np.asarray(same, bool))


def _teacher_embeddings(shards, pixels: np.ndarray) -> np.ndarray | None:
    from distill.teacher import Preprocessing, TeacherError, inspect_teacher, load_teacher

    rec = shards.teacher or {}
    path, sig = rec.get("path"), rec.get("signature") or {}
    if not path or not os.path.exists(path):
        log.warning("validation: the teacher %s the shards were made with is not on this machine; scoring "
                    "verification only, no teacher-student cosine", path)
        return None
    try:
        spec = inspect_teacher(path, sig.get("name", "serving_default"), sig.get("output"))
    except TeacherError as e:
        log.warning("validation: cannot load the teacher (%s); no teacher-student cosine", e)
        return None
    teacher = load_teacher(spec, Preprocessing(**(rec.get("preprocessing") or {})))
    return np.concatenate([teacher(pixels[a:a + 64]) for a in range(0, len(pixels), 64)])


class Validator:
    """Scores snapshots of the training model with a model of its own, built outside any
    distribution strategy, so validating on rank 0 needs no other rank: on the held-out people
    (``val``) and on each verification set (``bins``)."""

    def __init__(self, val: ValSet | None, spec, bins: tuple[BinSet, ...] = (), batch: int = 128):
        self.val, self.spec, self.bins, self.batch = val, spec, bins, batch
        self._full = self._model = None

    @property
    def source(self) -> str:
        return "; ".join(([self.val.source] if self.val else [])
                         + [f"{b.name} ({len(b.same)} pairs)" for b in self.bins])

    def load(self, state: dict) -> None:
        from distill.train.checkpoints import assign_model
        from distill.train.student import build_student, embedding_model

        if self._model is None:
            self._full = build_student(self.spec)
            self._model = embedding_model(self._full)  # shares the full model's layers
        assign_model(self._full, state)

    def embed(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([
            self._model(x[a:a + self.batch], training=False).numpy()
            for a in range(0, len(x), self.batch)
        ])

    def __call__(self, state: dict) -> dict[str, float]:
        self.load(state)
        out = score(self.embed(self.val.images), self.val) if self.val is not None else {}
        for b in self.bins:
            out.update(score_bin(self.embed(b.images), self.embed(b.images[:, :, ::-1]), b))
        return out
