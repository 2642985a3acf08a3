"""Verification metrics: pairs, ROC-AUC, accuracy, TAR at FAR, insightface's 10 folds.

Pure NumPy, no TensorFlow: ``distill.evaluate.run`` (``distill evaluate``), the trainer's
validation (``distill.train.validate``) and the synthetic teacher's check all score with these.

Written here rather than taken from scikit-learn (roc_auc_score, KFold), on purpose: it is
not otherwise a dependency (tens of MB, and its own SciPy pin, on every GPU node) for ~100
lines; the ROC-AUC must be exact over up to ~2M pairs with ties counted half (one sort, no
threshold grid), and the folds must reproduce insightface's verification.py, which uses
KFold(shuffle=False): tests/unit/test_evaluate.py checks them against brute force and
against sklearn's documented fold layout.
"""

from __future__ import annotations

import numpy as np

from distill.errors import BadInput

# insightface's verification.py: np.arange(0, 4, 0.01) over squared L2 of unit vectors.
BIN_THRESHOLDS = np.arange(0, 4, 0.01)
BIN_FOLDS = 10


def all_pairs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every unordered pair i < j, and whether it is the same identity."""
    labels = np.asarray(labels)
    i, j = np.triu_indices(len(labels), k=1)
    return i, j, labels[i] == labels[j]


def sample_pairs(labels: np.ndarray, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded sample of ``n_pairs`` pairs, half same-identity and half different.

    Same pairs: a random image from a class with at least two images and another image of
    its class; different pairs: two random images with different labels. Pairs are drawn
    with replacement (big folders make repeats rare); the result depends only on the inputs.
    """
    labels = np.asarray(labels)
    if n_pairs < 2:
        raise ValueError(f"need at least 2 pairs, got {n_pairs}")
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if len(classes) < 2:
        raise BadInput("verification needs at least two identities (folders)")
    if counts.max() < 2:
        raise BadInput("verification needs an identity with at least two images")
    members = np.argsort(inverse, kind="stable")  # images grouped by class
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n_same = n_pairs // 2
    n_diff = n_pairs - n_same

    eligible = np.flatnonzero(counts[inverse] >= 2)
    si = eligible[rng.integers(0, len(eligible), n_same)]
    c = inverse[si]
    # Pick another member of the same class: a random offset 1..count-1 from si's position.
    pos = np.empty(len(labels), np.int64)
    pos[members] = np.arange(len(labels)) - starts[inverse[members]]
    offset = rng.integers(1, counts[c])  # high is exclusive: 1..count-1
    sj = members[starts[c] + (pos[si] + offset) % counts[c]]

    # Different pairs by rejection: redraw the partners that share a label. With at least
    # two classes each round keeps a fixed fraction, so this ends in a few rounds.
    di = rng.integers(0, len(labels), n_diff)
    dj = rng.integers(0, len(labels), n_diff)
    for _ in range(10_000):
        clash = np.flatnonzero(labels[di] == labels[dj])
        if len(clash) == 0:
            break
        dj[clash] = rng.integers(0, len(labels), len(clash))
    else:
        raise BadInput("could not sample different-identity pairs: nearly all images share one identity")
    i = np.concatenate([si, di])
    j = np.concatenate([sj, dj])
    return i, j, labels[i] == labels[j]


def roc_auc(scores: np.ndarray, same: np.ndarray) -> float:
    """Exact ROC-AUC (higher score = more likely same), ties counted half (Mann-Whitney U)."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    n_pos = int(same.sum())
    n_neg = len(same) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs both same and different pairs")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    # Average 1-based rank over each run of tied scores.
    distinct = np.concatenate([[True], s[1:] != s[:-1]])
    run_id = np.cumsum(distinct) - 1
    run_start = np.flatnonzero(distinct)
    run_end = np.concatenate([run_start[1:], [len(s)]])
    avg_rank = (run_start + run_end + 1) / 2.0
    ranks = np.empty(len(s))
    ranks[order] = avg_rank[run_id]
    u = ranks[same].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def best_accuracy(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """Best accuracy of ``score >= threshold`` over every threshold, and that threshold.

    Only cuts between distinct scores count, so tied scores always fall on the same side.
    """
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    if len(scores) == 0:
        raise ValueError("no pairs to score")
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    y = same[order]
    n_neg = len(y) - int(y.sum())
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    cut = np.concatenate([s[1:] != s[:-1], [True]])  # a cut after position i is allowed
    acc = (tp + (n_neg - fp)) / len(y)
    acc = np.where(cut, acc, -1.0)
    k = int(np.argmax(acc))
    none_same = n_neg / len(y)  # threshold above every score
    if none_same > acc[k]:
        return float(none_same), float(np.nextafter(s[0], np.inf))
    return float(acc[k]), float(s[k])


def fold_bounds(n: int, folds: int) -> list[tuple[int, int]]:
    """Contiguous folds as sklearn's ``KFold(shuffle=False)`` makes them (insightface uses it):
    the first ``n % folds`` folds get one extra item."""
    if n < folds:
        raise ValueError(f"{n} pairs cannot make {folds} folds")
    sizes = [n // folds + (1 if k < n % folds else 0) for k in range(folds)]
    ends = np.cumsum(sizes)
    return [(int(e - s), int(e)) for s, e in zip(sizes, ends)]


def kfold_accuracy(
    distances: np.ndarray, same: np.ndarray, thresholds: np.ndarray = BIN_THRESHOLDS, folds: int = BIN_FOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """insightface's protocol: per fold, the threshold with the best accuracy of
    ``distance < t`` on the other folds (first best on ties) is scored on this fold.

    Returns (accuracy per fold, chosen threshold per fold).
    """
    distances = np.asarray(distances, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    bounds = fold_bounds(len(distances), folds)
    correct = (distances[None, :] < thresholds[:, None]) == same[None, :]  # [T, n]
    per_fold = np.stack([correct[:, a:b].sum(axis=1) for a, b in bounds], axis=1)  # [T, folds]
    total = per_fold.sum(axis=1)
    accs = np.empty(folds)
    chosen = np.empty(folds)
    for k, (a, b) in enumerate(bounds):
        train_acc = (total - per_fold[:, k]) / (len(distances) - (b - a))
        best = int(np.argmax(train_acc))
        chosen[k] = thresholds[best]
        accs[k] = per_fold[best, k] / (b - a)
    return accs, chosen


def best_distance_threshold(distances: np.ndarray, same: np.ndarray, thresholds: np.ndarray = BIN_THRESHOLDS) -> float:
    """The threshold of the grid that is best over all pairs (reported beside the folds)."""
    correct = (np.asarray(distances)[None, :] < np.asarray(thresholds)[:, None]) == np.asarray(same, bool)[None, :]
    return float(thresholds[int(np.argmax(correct.mean(axis=1)))])


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean row-wise cosine of two embedding matrices (each row L2-normalised first)."""
    return float(np.mean(np.sum(l2_normalise(a) * l2_normalise(b), axis=1)))


FARS = (1e-2, 1e-3, 1e-4)
# A TAR at FAR f is reported only when at least this many impostor pairs may score above its
# threshold (n_impostor * f >= 10): with fewer, one pair more or less moves the figure wildly.
MIN_FALSE_ACCEPTS = 10


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> float | None:
    """True accept rate at false accept rate ``far`` (higher score = more likely same): the share
    of genuine pairs scoring above the lowest threshold that accepts at most ``far`` of the
    impostor pairs. None when there are too few impostor pairs to support that rate
    (``MIN_FALSE_ACCEPTS``)."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    impostor = np.sort(scores[~same])[::-1]
    if len(impostor) * far < MIN_FALSE_ACCEPTS or not same.any():
        return None
    allowed = int(np.floor(far * len(impostor)))  # impostors that may score above the threshold
    threshold = impostor[allowed]  # accept score > threshold: at most `allowed` impostors (fewer on ties)
    return float(np.mean(scores[same] > threshold))


def roc_curve(scores: np.ndarray, same: np.ndarray, points: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(FAR, TAR) at ``points`` false accept rates spaced evenly in log from one impostor pair
    to all of them, each as ``tar_at_far`` computes it (without its support check). Pure."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    impostor = np.sort(scores[~same])[::-1]
    genuine = np.sort(scores[same])
    if not len(impostor) or not len(genuine):
        raise ValueError("a ROC curve needs both same and different pairs")
    far = np.logspace(np.log10(1.0 / len(impostor)), 0.0, points)
    allowed = np.minimum(np.floor(far * len(impostor)).astype(np.int64), len(impostor) - 1)
    threshold = impostor[allowed]
    tar = 1.0 - np.searchsorted(genuine, threshold, side="right") / len(genuine)
    tar[far >= 1.0] = 1.0  # (accepting every impostor accepts every genuine pair too)
    return far, tar


def far_key(far: float) -> str:
    """The key of a FAR in results: ``1e-03``."""
    return f"{far:.0e}"


def tar_table(scores: np.ndarray, same: np.ndarray, fars=FARS) -> dict[str, float | None]:
    """TAR at each of ``fars`` (None where the impostor pairs do not support it)."""
    return {far_key(f): tar_at_far(scores, same, f) for f in fars}
