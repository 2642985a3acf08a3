"""Verification metrics: pairs, ROC-AUC, accuracy, TAR at FAR, insightface's 10 folds.

Pure NumPy, no TensorFlow: ``distill.evaluate.run`` (``distill evaluate``), the trainer's
validation (``distill.train.validate``) and the synthetic teacher's check all score with these.

Written here rather than taken from scikit-learn (roc_auc_score, KFold), on purpose: it is
not otherwise a dependency (tens of MB, and its own SciPy pin, on every GPU node) for ~100
lines; the ROC-AUC must be exact over up to ~2M pairs with ties counted half (one sort, no
threshold grid), and the folds must reproduce insightface's verification.py, which uses
KFold(shuffle=False) on a .bin: tests/unit/test_evaluate.py checks them against brute force
and against sklearn's documented fold layout. A folder's pairs (which come ordered) get the
same 10 folds laid over a seeded shuffle, with exact thresholds (``fold_accuracy``).

Pairs are distinct (``sample_pairs`` draws without replacement): a TAR at FAR f is reported
only where the distinct impostor pairs support it (``far_supported``).
"""

from __future__ import annotations

import math
from typing import Callable

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


def pair_counts(labels: np.ndarray) -> tuple[int, int]:
    """(distinct same-identity pairs, distinct different-identity pairs) among the images."""
    counts = np.unique(np.asarray(labels), return_counts=True)[1].astype(np.int64)
    n = int(counts.sum())
    same = int((counts * (counts - 1) // 2).sum())
    return same, n * (n - 1) // 2 - same


def sample_pairs(labels: np.ndarray, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded sample of ``n_pairs`` *distinct* unordered pairs ``i < j``: half same-identity,
    half different, each half a uniform sample without replacement of its kind.

    When a half asks for more pairs than exist (``pair_counts``), it is every pair of its
    kind: the result is then shorter than ``n_pairs`` (the caller says so). Same pairs come
    first, each half sorted by ``(i, j)``; the result depends only on the inputs. Memory stays
    O(``n_pairs`` + images): a kind is enumerated only when the request is over half of it,
    otherwise pairs are drawn (uniformly over that kind) and repeats redrawn.
    """
    labels = np.asarray(labels)
    if n_pairs < 2:
        raise ValueError(f"need at least 2 pairs, got {n_pairs}")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if len(classes) < 2:
        raise BadInput("verification needs at least two identities (folders)")
    if counts.max() < 2:
        raise BadInput("verification needs an identity with at least two images")
    n = len(labels)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x9A125])))
    # Positions 0..n-1 list the images grouped by class; position p is image members[p], its
    # class's block is [start[p], end[p]).
    members = np.argsort(inverse, kind="stable")
    ends = np.cumsum(counts)
    start = np.repeat(ends - counts, counts)
    end = np.repeat(ends, counts)
    n_same_all, n_diff_all = pair_counts(labels)
    positions = np.arange(n, dtype=np.int64)

    def same_from(p: np.ndarray, r: np.ndarray) -> np.ndarray:  # r in [0, size - 1): another member
        size = end[p] - start[p]
        return start[p] + (p - start[p] + 1 + r) % size

    def diff_from(p: np.ndarray, r: np.ndarray) -> np.ndarray:  # r in [0, n - size): outside the block
        return np.where(r < start[p], r, r + (end[p] - start[p]))

    same_codes = _distinct_pairs(n_pairs // 2, n_same_all, end - positions - 1, positions + 1,
                                 end - start - 1, same_from, members, n, rng)
    diff_codes = _distinct_pairs(n_pairs - n_pairs // 2, n_diff_all, n - end, end,
                                 n - (end - start), diff_from, members, n, rng)
    codes = np.concatenate([same_codes, diff_codes])
    i, j = codes // n, codes % n
    return i, j, labels[i] == labels[j]


def _distinct_pairs(need: int, available: int, later: np.ndarray, first_later: np.ndarray, partners: np.ndarray,
                    partner_of: Callable, members: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted codes ``i * n + j`` (``i < j``, image numbers) of ``min(need, available)`` distinct
    pairs of one kind, a uniform sample of them.

    The kind is given over class-grouped positions: position ``p`` pairs with ``later[p]``
    positions from ``first_later[p]`` on (each unordered pair once: to enumerate), and with
    ``partners[p]`` positions in all, ``partner_of(p, r)`` the ``r``-th (each pair twice: to
    draw, so that every unordered pair is equally likely).
    """
    need = min(need, available)
    if 2 * need > available:  # enumerate (at most 2 * need pairs), then choose without replacement
        p = np.repeat(np.arange(n, dtype=np.int64), later)
        offset = np.arange(len(p), dtype=np.int64) - np.repeat(np.cumsum(later) - later, later)
        codes = _codes(members[p], members[np.repeat(first_later, later) + offset], n)
        if need < available:
            codes = codes[rng.choice(available, need, replace=False)]
        return np.sort(codes)
    # Draw ordered pairs uniformly (a position by its partner count, then one of its partners);
    # keep the first occurrence of each unordered pair. Each draw is new with probability >= 1/2.
    cum = np.cumsum(partners)
    codes = np.zeros(0, np.int64)
    while len(codes) < need:
        r = rng.integers(0, cum[-1], 2 * (need - len(codes)) + 16)
        p = np.searchsorted(cum, r, side="right")
        q = partner_of(p, r - (cum[p] - partners[p]))
        codes = np.concatenate([codes, _codes(members[p], members[q], n)])
        _, first = np.unique(codes, return_index=True)
        codes = codes[np.sort(first)]
    return np.sort(codes[:need])


def _codes(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    return np.minimum(a, b).astype(np.int64) * n + np.maximum(a, b)


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

    Only cuts between distinct scores count, so tied scores always fall on the same side; the
    threshold is the midpoint between the two scores around the cut (the lowest score when
    every pair is accepted, just above the highest when none is). On ties the highest such
    threshold wins, as insightface's first best distance does. This accuracy is read on the
    pairs that chose its threshold: a figure to report is ``fold_accuracy``'s.
    """
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    if len(scores) == 0:
        raise ValueError("no pairs to score")
    order = np.argsort(-scores, kind="mergesort")
    return _best_cut(scores[order], same[order])


def _best_cut(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``best_accuracy`` of scores ``s`` sorted from the highest, with their labels ``y``."""
    n = len(y)
    n_neg = n - int(y.sum())
    cut = np.concatenate([s[1:] != s[:-1], [True]])  # a cut after position k is allowed
    acc = np.where(cut, (np.cumsum(y) + (n_neg - np.cumsum(~y))) / n, -1.0)
    k = int(np.argmax(acc))  # the first best: the highest threshold
    if n_neg / n >= acc[k]:  # accepting none (the highest threshold of all) is as good
        return float(n_neg / n), float(np.nextafter(s[0], np.inf))
    if k == n - 1:
        return float(acc[k]), float(s[k])
    # (the midpoint of two adjacent floats may round onto the lower one: keep it above)
    return float(acc[k]), float(max((s[k] + s[k + 1]) / 2, np.nextafter(s[k + 1], np.inf)))


FOLDS = 10


def fold_of(n: int, folds: int, seed: int) -> np.ndarray:
    """The fold of each of ``n`` pairs: ``fold_bounds``' contiguous folds laid over a seeded
    shuffle of the pairs (folder pairs come ordered, same first). Pure."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0xF01D])))
    order = rng.permutation(n)
    fold = np.empty(n, np.int64)
    for k, (a, b) in enumerate(fold_bounds(n, folds)):
        fold[order[a:b]] = k
    return fold


def fold_accuracy(scores: np.ndarray, same: np.ndarray, seed: int, folds: int = FOLDS) -> tuple[np.ndarray, np.ndarray]:
    """insightface's protocol over similarity scores: per fold, the threshold of
    ``best_accuracy`` on the other folds, and the accuracy of ``score >= threshold`` on this
    one; folds from ``fold_of`` (fewer pairs than ``folds``: one pair per fold). Exact, no
    threshold grid; O(pairs) memory. Returns (accuracy per fold, threshold per fold)."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    if len(scores) < 2:
        raise ValueError("the folds need at least 2 pairs")
    folds = min(folds, len(scores))
    order = np.argsort(-scores, kind="mergesort")
    s, y, fold = scores[order], same[order], fold_of(len(scores), folds, seed)[order]
    accs, chosen = np.empty(folds), np.empty(folds)
    for k in range(folds):
        test = fold == k
        _, chosen[k] = _best_cut(s[~test], y[~test])
        accs[k] = np.mean((s[test] >= chosen[k]) == y[test])
    return accs, chosen


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
# A TAR at FAR f is reported only when at least this many *distinct* impostor pairs may score
# above its threshold (n_impostor * f >= 10): with fewer, one pair more or less moves the
# figure wildly, and a pair counted twice carries no new information.
MIN_FALSE_ACCEPTS = 10
TAR_RULE = f"TAR@FAR is reported where distinct impostor_pairs * FAR >= {MIN_FALSE_ACCEPTS}; null elsewhere"


def min_impostor_pairs(far: float) -> int:
    """The fewest distinct impostor pairs that support a TAR at ``far``: 1e-3 -> 10,000."""
    return math.ceil(MIN_FALSE_ACCEPTS / far - 1e-9)  # (10 / 1e-3 must not round up to 10,001)


def far_supported(n_impostor: int, far: float) -> bool:
    return n_impostor >= min_impostor_pairs(far)


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> float | None:
    """True accept rate at false accept rate ``far`` (higher score = more likely same): the share
    of genuine pairs scoring above the lowest threshold that accepts at most ``far`` of the
    impostor pairs. None when there are too few impostor pairs to support that rate
    (``far_supported``; the pairs must be distinct: ``sample_pairs`` makes them so)."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    impostor = np.sort(scores[~same])[::-1]
    if not far_supported(len(impostor), far) or not same.any():
        return None
    allowed = int(np.floor(far * len(impostor)))  # impostors that may score above the threshold
    threshold = impostor[allowed]  # accept score > threshold: at most `allowed` impostors (fewer on ties)
    return float(np.mean(scores[same] > threshold))


# A model whose same- and different-person pairs score alike has not learnt faces (a student
# collapsed onto one direction scores every pair ~1): its AUC and accuracy read as chance, but
# a threshold and a TAR are still printed, so say it outright.
COLLAPSED_COSINE = 0.99
CONSTANT_SCORE_STD = 0.01
CHANCE_AUC_MARGIN = 0.05


def collapse_warning(same_cosine: float, different_cosine: float, auc: float, score_std: float) -> str | None:
    """Why same- and different-person pairs do not separate, or None when they may: both mean
    cosines above ``COLLAPSED_COSINE``, or near-constant cosines (std below
    ``CONSTANT_SCORE_STD``) with a ROC-AUC within ``CHANCE_AUC_MARGIN`` of 0.5. Pure."""
    if same_cosine > COLLAPSED_COSINE and different_cosine > COLLAPSED_COSINE:
        return (f"same- and different-person pairs both have mean cosine above {COLLAPSED_COSINE} (same "
                f"{same_cosine:.4f}, different {different_cosine:.4f}): the embeddings have collapsed onto one "
                "direction and tell no one apart")
    if score_std < CONSTANT_SCORE_STD and abs(auc - 0.5) < CHANCE_AUC_MARGIN:
        return (f"every pair scores about the same cosine (std {score_std:.4f}) and ROC-AUC is {auc:.4f}, "
                "chance: the embeddings do not tell people apart")
    return None


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
