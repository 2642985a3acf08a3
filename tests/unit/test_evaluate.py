"""The pure parts of evaluate: distinct pairs, ROC-AUC, best accuracy, the 10-fold protocols,
which TAR@FAR is supported, a collapsed model, the tables, the refusals before any model
loads, and the restricted unpickler of .bin files. No TensorFlow, no models."""

from __future__ import annotations

import itertools
import os
import pickle
import subprocess
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from distill.evaluate.run import EvaluateConfig, format_table
from distill.heldout import UnsafePickle, loads_bin, scan_folders
from distill.metrics import (
    BIN_THRESHOLDS,
    FARS,
    MIN_FALSE_ACCEPTS,
    all_pairs,
    best_accuracy,
    best_distance_threshold,
    collapse_warning,
    far_key,
    far_supported,
    fold_accuracy,
    fold_bounds,
    fold_of,
    kfold_accuracy,
    mean_cosine,
    min_impostor_pairs,
    pair_counts,
    roc_auc,
    sample_pairs,
    tar_at_far,
    tar_table,
)

# --- pairs -------------------------------------------------------------------------------


def test_all_pairs_counts_every_unordered_pair_once():
    labels = np.array([0, 0, 0, 1, 1, 2])
    i, j, same = all_pairs(labels)
    assert len(i) == 6 * 5 // 2
    assert np.all(i < j)
    assert len(set(zip(i.tolist(), j.tolist()))) == len(i)
    assert same.sum() == 3 + 1  # C(3,2) + C(2,2)
    assert np.array_equal(same, labels[i] == labels[j])
    assert pair_counts(labels) == (4, 11)


def _every_pair(labels):
    """Brute force: every unordered pair i < j of each kind."""
    pairs = list(itertools.combinations(range(len(labels)), 2))
    return {p for p in pairs if labels[p[0]] == labels[p[1]]}, {p for p in pairs if labels[p[0]] != labels[p[1]]}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_pairs", [2, 3, 7, 40, 150, 5000])
def test_sample_pairs_are_distinct_correct_and_seeded_against_brute_force(seed, n_pairs):
    rng = np.random.default_rng(1000 * seed + n_pairs)
    n = int(rng.integers(3, 45))
    labels = rng.integers(0, int(rng.integers(2, 9)), n) * 7  # sparse class ids must not matter
    labels[:3] = [14, 14, 5]  # two identities, one of them with two images
    same_all, diff_all = _every_pair(labels)
    assert pair_counts(labels) == (len(same_all), len(diff_all))
    i, j, same = sample_pairs(labels, n_pairs, seed)
    got = list(zip(i.tolist(), j.tolist()))
    assert np.all(i < j) and len(set(got)) == len(got)  # distinct unordered pairs
    assert np.array_equal(same, labels[i] == labels[j])
    assert {p for p, s in zip(got, same) if s} <= same_all and {p for p, s in zip(got, same) if not s} <= diff_all
    assert same.sum() == min(n_pairs // 2, len(same_all))
    assert (~same).sum() == min(n_pairs - n_pairs // 2, len(diff_all))
    if n_pairs // 2 >= len(same_all):  # asked for more than exist: every one of them
        assert set(p for p, s in zip(got, same) if s) == same_all
    if n_pairs - n_pairs // 2 >= len(diff_all):
        assert set(p for p, s in zip(got, same) if not s) == diff_all
    again = sample_pairs(labels, n_pairs, seed)
    assert all(np.array_equal(a, b) for a, b in zip((i, j, same), again))


@pytest.mark.parametrize("need", [3, 7])  # drawn (need <= half of the 10 same pairs) and enumerated
def test_sample_pairs_draws_every_pair_of_a_kind_equally_often(need):
    # Classes of 2, 3 and 4 images: a draw biased by class (not by pair) would favour the small ones.
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    same_all, diff_all = _every_pair(labels)
    hits = Counter()
    runs = 1500
    for seed in range(runs):
        i, j, same = sample_pairs(labels, 2 * need, seed)
        hits.update(zip(i[same].tolist(), j[same].tolist()))
    expect = runs * need / len(same_all)
    assert set(hits) == same_all
    assert all(abs(h - expect) < 5 * np.sqrt(expect) for h in hits.values()), hits


def test_sample_pairs_asking_for_more_than_exist_gives_all_of_them_and_no_unsupported_tar():
    # 5 people x 5 images: 50 same and 250 different pairs. Drawn with replacement, 20,000 pairs
    # once "held" 10,000 impostor pairs, and TAR@1e-3 was printed from these 250.
    labels = np.repeat(np.arange(5), 5)
    i, j, same = sample_pairs(labels, 20000, 0)
    ai, aj, asame = all_pairs(labels)
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(zip(ai.tolist(), aj.tolist()))
    assert same.sum() == 50 and (~same).sum() == 250
    scores = np.random.default_rng(0).normal(same.astype(float), 1.0)
    assert all(v is None for v in tar_table(scores, same).values())  # 250 x 1e-2 = 2.5 < 10


def test_sample_pairs_stays_small_on_a_big_folder():
    # 200,000 images: all pairs would be 2e10. Many people, and one person holding nearly all.
    rng = np.random.default_rng(0)
    for labels in (rng.integers(0, 20000, 200_000), np.r_[np.zeros(199_990, np.int64), np.arange(1, 11)]):
        i, j, same = sample_pairs(labels, 20000, 1)
        assert len(i) == 20000 and same.sum() == 10000 and np.all(i < j)
        assert len(np.unique(i * len(labels) + j)) == 20000
        assert np.array_equal(same, labels[i] == labels[j])


def test_sample_pairs_differs_between_seeds():
    labels = np.repeat(np.arange(50), 8)
    a = sample_pairs(labels, 200, 0)
    b = sample_pairs(labels, 200, 1)
    assert not np.array_equal(a[0], b[0])


def test_sample_pairs_refuses_what_cannot_make_pairs():
    with pytest.raises(ValueError, match="two identities"):
        sample_pairs(np.zeros(10, int), 10, 0)
    with pytest.raises(ValueError, match="at least two images"):
        sample_pairs(np.arange(10), 10, 0)


# --- ROC-AUC and best accuracy, against brute force --------------------------------------


def _auc_brute(scores, same):
    pos, neg = scores[same], scores[~same]
    gt = (pos[:, None] > neg[None, :]).sum()
    eq = (pos[:, None] == neg[None, :]).sum()
    return (gt + 0.5 * eq) / (len(pos) * len(neg))


def _best_acc_brute(scores, same):
    cands = np.concatenate([np.unique(scores), [np.inf]])
    return max(np.mean((scores >= t) == same) for t in cands)


@pytest.mark.parametrize("seed", range(20))
def test_roc_auc_and_best_accuracy_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 200))
    same = rng.random(n) < rng.uniform(0.1, 0.9)
    same[0], same[1] = True, False
    # Coarse scores make many ties, the case an off-by-one in ranking gets wrong.
    scores = np.round(rng.normal(same * rng.uniform(0, 2), 1.0), int(rng.integers(0, 3)))
    assert roc_auc(scores, same) == pytest.approx(_auc_brute(scores, same), abs=1e-12)
    acc, thr = best_accuracy(scores, same)
    assert acc == pytest.approx(_best_acc_brute(scores, same), abs=1e-12)
    assert np.mean((scores >= thr) == same) == pytest.approx(acc, abs=1e-12)


def test_roc_auc_known_values():
    same = np.array([True, True, False, False])
    assert roc_auc(np.array([0.9, 0.8, 0.1, 0.2]), same) == 1.0
    assert roc_auc(np.array([0.1, 0.2, 0.9, 0.8]), same) == 0.0
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), same) == 0.5
    with pytest.raises(ValueError, match="both same and different"):
        roc_auc(np.array([0.1, 0.2]), np.array([True, True]))


def test_best_accuracy_separable_and_all_negative():
    scores = np.array([0.9, 0.8, 0.3, 0.1])
    acc, thr = best_accuracy(scores, np.array([True, True, False, False]))
    assert acc == 1.0 and 0.3 < thr <= 0.8
    acc, thr = best_accuracy(scores, np.array([False, False, False, True]))
    assert acc == 0.75 and thr > 0.9  # predicting "different" everywhere wins


# --- the 10-fold protocol ----------------------------------------------------------------


def test_fold_bounds_match_sklearn_kfold_layout():
    assert fold_bounds(6000, 10) == [(600 * k, 600 * (k + 1)) for k in range(10)]
    b = fold_bounds(23, 10)
    assert [e - s for s, e in b] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert b[0][0] == 0 and b[-1][1] == 23
    assert all(b[k][1] == b[k + 1][0] for k in range(9))
    with pytest.raises(ValueError, match="folds"):
        fold_bounds(5, 10)


def _kfold_reference(dist, same, thresholds, folds):
    """insightface verification.calculate_roc's accuracy part, written as plain loops."""
    n = len(dist)
    idx = np.arange(n)
    accs, chosen = [], []
    for a, b in fold_bounds(n, folds):
        test = idx[a:b]
        train = np.concatenate([idx[:a], idx[b:]])
        train_acc = [np.mean((dist[train] < t) == same[train]) for t in thresholds]
        t = thresholds[int(np.argmax(train_acc))]
        chosen.append(t)
        accs.append(np.mean((dist[test] < t) == same[test]))
    return np.array(accs), np.array(chosen)


def test_kfold_separable_distances_score_perfectly_with_the_first_separating_threshold():
    same = np.tile([True, False], 300)
    dist = np.where(same, 0.5, 1.5)
    accs, thr = kfold_accuracy(dist, same)
    assert np.all(accs == 1.0)
    # dist < t must put 0.5 below and 1.5 above: the first such grid value is 0.51.
    assert np.allclose(thr, 0.51)
    assert best_distance_threshold(dist, same) == pytest.approx(0.51)


def test_kfold_threshold_comes_from_the_other_nine_folds():
    # Folds 0..8: same pairs at 0.3, different at 1.0. Fold 9 holds the *same* pairs at 0.8:
    # the threshold learnt elsewhere (0.31) misses all of them, so fold 9 scores 0.5.
    same = np.tile([True, False], 50)
    dist = np.where(same, 0.3, 1.0)
    dist[90:100][same[90:100]] = 0.8
    accs, thr = kfold_accuracy(dist, same)
    assert np.allclose(accs[:9], 1.0)
    assert accs[9] == 0.5
    assert thr[9] == pytest.approx(0.31)
    # Folds 0..8 see fold 9's pairs in training: 0.81 also fits those, 0.31 would miss 5 of 90.
    assert np.allclose(thr[:9], 0.81)


@pytest.mark.parametrize("seed", range(6))
def test_kfold_matches_reference_loops(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 300))
    same = rng.random(n) < 0.5
    dist = np.clip(rng.normal(np.where(same, 0.9, 1.6), 0.4), 0, 4)
    accs, thr = kfold_accuracy(dist, same)
    ref_accs, ref_thr = _kfold_reference(dist, same, BIN_THRESHOLDS, 10)
    assert np.allclose(accs, ref_accs)
    assert np.array_equal(thr, ref_thr)


# --- folder accuracy: 10 folds of the shuffled pairs ------------------------------------------


def test_fold_of_cuts_a_seeded_shuffle_into_kfold_sized_folds():
    for n, folds in ((23, 10), (100, 10), (7, 7)):
        fold = fold_of(n, folds, seed=4)
        assert np.array_equal(fold, fold_of(n, folds, seed=4))
        assert np.bincount(fold, minlength=folds).tolist() == [b - a for a, b in fold_bounds(n, folds)]
    assert not np.array_equal(fold_of(100, 10, 0), fold_of(100, 10, 1))
    # Shuffled: same-first folder pairs do not make a fold of same pairs only.
    fold = fold_of(1000, 10, 0)
    assert all(0 < np.sum(fold[:100] == k) < 30 for k in range(10))  # (10 each on average)


def _fold_accuracy_brute_force(scores, same, seed, folds=10):
    """Per fold: every threshold between adjacent distinct training scores (plus above all and
    at the lowest), the highest of the best on the training folds, scored on the test fold."""
    fold = fold_of(len(scores), folds, seed)
    accs, chosen = [], []
    for k in range(folds):
        train_s, train_y = scores[fold != k], same[fold != k]
        u = np.unique(train_s)[::-1]  # highest first
        cands = [np.nextafter(u[0], np.inf)] + [max((a + b) / 2, np.nextafter(b, np.inf)) for a, b in zip(u, u[1:])]
        cands.append(u[-1])
        train_acc = [np.mean((train_s >= t) == train_y) for t in cands]
        t = cands[int(np.argmax(train_acc))]
        chosen.append(t)
        accs.append(np.mean((scores[fold == k] >= t) == same[fold == k]))
    return np.array(accs), np.array(chosen)


@pytest.mark.parametrize("seed", range(12))
def test_fold_accuracy_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 250))
    same = np.sort(rng.random(n) < rng.uniform(0.1, 0.9))[::-1]  # same first, as folder pairs come
    same[-1] = False
    scores = np.round(rng.normal(same * rng.uniform(0, 2), 1.0), int(rng.integers(0, 3)))  # coarse: ties
    accs, chosen = fold_accuracy(scores, same, seed)
    ref_accs, ref_chosen = _fold_accuracy_brute_force(scores, same, seed)
    assert np.allclose(accs, ref_accs) and np.array_equal(chosen, ref_chosen)


def test_fold_accuracy_scores_each_fold_with_a_threshold_it_did_not_choose():
    # Separable scores: perfect. A fold's own odd pairs cannot move its threshold.
    same = np.tile([True, False], 100)
    scores = np.where(same, 0.8, 0.2)
    accs, chosen = fold_accuracy(scores, same, seed=0)
    assert np.all(accs == 1.0) and np.allclose(chosen, 0.5)
    # Best accuracy over all pairs flatters pure noise; the folds do not.
    rng = np.random.default_rng(0)
    noise, labels = rng.random(400), rng.random(400) < 0.5
    assert best_accuracy(noise, labels)[0] > fold_accuracy(noise, labels, 0)[0].mean()
    # Fewer pairs than folds: one pair per fold.
    assert len(fold_accuracy(np.array([0.9, 0.1, 0.8]), np.array([True, False, True]), 0)[0]) == 3


def _tar_brute_force(scores, same, far):
    """The best TAR over every threshold t (accept score > t) whose FAR is at most ``far``."""
    neg, pos = scores[~same], scores[same]
    best = 0.0
    for t in np.concatenate([[-np.inf], np.unique(scores)]):
        if np.mean(neg > t) <= far:
            best = max(best, float(np.mean(pos > t)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_tar_at_far_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 4000
    same = rng.random(n) < 0.3
    scores = np.round(rng.normal(same * 1.5, 1.0), 1)  # coarse: many ties
    for far in (1e-2, 5e-3):
        assert tar_at_far(scores, same, far) == pytest.approx(_tar_brute_force(scores, same, far))
    assert tar_at_far(scores, same, 1e-3) is None  # 2,800 impostor pairs cannot support 1e-3 (10 false accepts)
    table = tar_table(scores, same)
    assert set(table) == {"1e-02", "1e-03", "1e-04"} and table["1e-03"] is None and table["1e-02"] is not None


def test_tar_at_far_separable_and_hopeless():
    same = np.array([True] * 50 + [False] * 1000)
    assert tar_at_far(np.r_[np.full(50, 2.0), np.zeros(1000)], same, 1e-2) == 1.0
    assert tar_at_far(np.r_[np.zeros(50), np.full(1000, 2.0)], same, 1e-2) == 0.0


@pytest.mark.parametrize("far", [1e-2, 1e-3, 1e-4, 3e-3, 0.05])
def test_the_tar_support_rule_against_exact_counts(far):
    need = min_impostor_pairs(far)
    for n in sorted({1, 9, need - 1, need, need + 1, 10 * need}):
        assert far_supported(n, far) == (Fraction(n) * Fraction(repr(far)) >= MIN_FALSE_ACCEPTS), (n, far)
    assert (min_impostor_pairs(1e-2), min_impostor_pairs(1e-3), min_impostor_pairs(1e-4)) == (1000, 10000, 100000)


@pytest.mark.parametrize("seed", range(4))
def test_tar_is_reported_exactly_where_the_distinct_impostor_pairs_support_it(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, int(rng.integers(3, 30)), int(rng.integers(20, 200)))
    labels[:2] = 0
    i, j, same = sample_pairs(labels, 30000, seed)
    distinct_impostors = len({(a, b) for a, b, s in zip(i.tolist(), j.tolist(), same) if not s})
    table = tar_table(rng.normal(same.astype(float), 1.0), same)
    for far in FARS:
        supported = Fraction(distinct_impostors) * Fraction(repr(far)) >= MIN_FALSE_ACCEPTS
        assert (table[far_key(far)] is not None) == supported


def test_mean_cosine_normalises_rows():
    a = np.array([[3.0, 0.0], [0.0, 2.0]])
    b = np.array([[1.0, 0.0], [5.0, 0.0]])
    assert mean_cosine(a, b) == pytest.approx(0.5)


# --- a collapsed model -------------------------------------------------------------------


def test_collapse_warning_names_pairs_that_do_not_separate():
    assert "collapsed" in collapse_warning(0.999, 0.995, 0.62, 0.002)  # everything points one way
    assert "chance" in collapse_warning(0.41, 0.409, 0.51, 0.004)  # near-constant cosines, AUC ~0.5
    assert collapse_warning(0.999, 0.95, 0.99, 0.03) is None  # different pairs clearly lower
    assert collapse_warning(0.6, 0.1, 0.97, 0.3) is None  # a working model
    assert collapse_warning(0.2, 0.19, 0.52, 0.2) is None  # weak, but the scores spread: not constant
    assert collapse_warning(0.4, 0.4, 0.7, 0.005) is None  # narrow, but it ranks pairs


def test_collapse_is_flagged_on_real_pair_scores():
    from distill.evaluate.run import _pair_figures

    rng = np.random.default_rng(0)
    same = rng.random(500) < 0.3
    collapsed = 0.999 + rng.normal(0, 1e-4, 500)
    r = _pair_figures(collapsed, collapsed, same)
    assert r["collapsed"] and "collapsed" in r["collapse_warning"]
    healthy = np.clip(np.where(same, 0.7, 0.1) + rng.normal(0, 0.1, 500), -1, 1)
    r = _pair_figures(healthy, healthy, same)
    assert not r["collapsed"] and r["collapse_warning"] is None


# --- the restricted unpickler ------------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_bin_loads_lists_of_bytes_and_bools(protocol):
    bins = [b"\xff\xd8img%d" % k for k in range(6)]
    issame = [True, False, True]
    images, same = loads_bin(pickle.dumps((bins, issame), protocol=protocol))
    assert images == bins
    assert same.tolist() == issame


@pytest.mark.parametrize("protocol", [2, 4])
def test_bin_loads_numpy_containers(protocol):
    bins = np.array([b"a", b"bb", b"ccc", b"d"], dtype=object)
    issame = np.array([True, False])
    images, same = loads_bin(pickle.dumps((bins, issame), protocol=protocol))
    assert images == [b"a", b"bb", b"ccc", b"d"]
    assert same.dtype == bool and same.tolist() == [True, False]
    u8 = [np.frombuffer(b"xyz", np.uint8), np.frombuffer(b"uv", np.uint8)]
    images, same = loads_bin(pickle.dumps((u8, [np.bool_(True)]), protocol=protocol))
    assert images == [b"xyz", b"uv"] and same.tolist() == [True]


class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvilSubprocess:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (subprocess.call, (["sh", "-c", self.command],))


class _EvilEval:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (eval, (f"__import__('os').system({self.command!r})",))


@pytest.mark.parametrize("evil", [_Evil, _EvilSubprocess, _EvilEval])
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_malicious_bin_is_refused_and_nothing_runs(tmp_path, evil, protocol):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(([b"a", b"b"], [evil(f"touch {marker}")]), protocol=protocol)
    with pytest.raises(UnsafePickle, match="refusing to load .* Nothing from it was run"):
        loads_bin(payload)
    assert not marker.exists()


def test_bin_refuses_numpy_dtypes_it_does_not_need():
    payload = pickle.dumps(([b"a", b"b"], np.array([1.5])), protocol=4)
    with pytest.raises(UnsafePickle, match="float64"):
        loads_bin(payload)


def test_bin_with_wrong_shape_says_what_it_expected():
    with pytest.raises(ValueError, match=r"\(bins, issame_list\)"):
        loads_bin(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="2 images per pair"):
        loads_bin(pickle.dumps(([b"a", b"b", b"c"], [True, False])))
    with pytest.raises(ValueError, match="not encoded image bytes"):
        loads_bin(pickle.dumps(([b"a", 7], [True])))
    with pytest.raises(ValueError, match="not a verification .bin"):
        loads_bin(b"this is not a pickle")


# --- config, folders, table --------------------------------------------------------------


def test_config_needs_a_dataset_and_takes_several_in_order():
    with pytest.raises(ValueError, match="--folders DIR .* and/or --bin FILE"):
        EvaluateConfig(model="m")
    cfg = EvaluateConfig(model="m", folders="d, e", bin="lfw.bin,cfp_fp.bin")
    assert cfg.targets == (("folders", "d"), ("folders", "e"), ("bin", "lfw.bin"), ("bin", "cfp_fp.bin"))
    with pytest.raises(ValueError, match="given twice: lfw.bin, lfw.bin"):
        EvaluateConfig(model="m", bin="lfw.bin,lfw.bin")
    with pytest.raises(ValueError, match="--pairs"):
        EvaluateConfig(model="m", folders="d", pairs=1)


def test_scan_folders_labels_follow_sorted_names(tmp_path):
    for name, files in {"bob": ["2.jpg", "1.PNG", "notes.txt"], "alice": ["a.pgm"], "empty": []}.items():
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_bytes(b"x")
    paths, labels, names = scan_folders(str(tmp_path))
    assert names == ["alice", "bob", "empty"]
    assert [os.path.relpath(p, tmp_path) for p in paths] == ["alice/a.pgm", "bob/1.PNG", "bob/2.jpg"]
    assert labels.tolist() == [0, 1, 1]
    with pytest.raises(FileNotFoundError, match="--folders"):
        scan_folders(str(tmp_path / "nope"))


def _folder_results(**dataset):
    ds = {"kind": "folders", "path": "d", "images": 10, "identities": 2, "pairs": 45, "same_pairs": 20,
          "impostor_pairs": 25, "pairs_requested": None, "same_pairs_available": 20, "impostor_pairs_available": 25,
          "all_same_pairs": True, "all_impostor_pairs": True, "sampled": False, "seed": 0, "folds": 10,
          "chance_accuracy": 0.5556, **dataset}
    return {
        "targets": [{
            "dataset": ds,
            "models": {
                "model": {"auc": 0.91, "accuracy_mean": 0.8, "accuracy_std": 0.05, "threshold_cosine": 0.4,
                          "images_per_second": 50.0, "tar_at_far": {"1e-02": 0.625, "1e-03": None, "1e-04": None},
                          "collapsed": False, "collapse_warning": None},
                "teacher": {"auc": 0.97, "accuracy_mean": 0.9, "accuracy_std": 0.01, "threshold_cosine": 0.5,
                            "images_per_second": 20.0, "collapsed": True, "collapse_warning": "all alike"},
            },
            "mean_cosine": 0.8765,
        }],
        "kinds": {"model": "student", "teacher": "teacher"},
    }


def test_format_table_shows_each_model_the_units_and_the_rules():
    text = format_table(_folder_results())
    assert "0.9100" in text and "0.9700" in text and "student" in text and "0.8000 +- 0.0500" in text
    assert "mean teacher-student cosine: 0.8765" in text and "WARNING teacher: all alike" in text
    assert "cos thr" in text and "sq-L2" not in text and "10 folds of the shuffled pairs" in text
    assert "TAR@1e-03" in text and "0.6250" in text and "distinct impostor pairs x FAR >= 10" in text
    assert "--pairs" not in text and "more identities or images are needed" in text  # (all 25 are used)
    bin_results = {"kinds": {"model": "student"}, "targets": [{
        "dataset": {"kind": "bin", "path": "lfw.bin", "pairs": 6000, "same_pairs": 3000, "impostor_pairs": 3000,
                    "chance_accuracy": 0.5, "folds": 10, "flip_test": True},
        "models": {"model": {"auc": 0.99, "accuracy_mean": 0.99, "accuracy_std": 0.003, "threshold_sq_l2": 1.42,
                             "images_per_second": 9.0, "tar_at_far": {"1e-02": 0.98, "1e-03": None, "1e-04": None}}},
        "mean_cosine": None}]}
    text = format_table(bin_results)
    assert "sq-L2 thr" in text and "1.42" in text and "cos thr" not in text and "flip test, 10 folds" in text
    assert "3,000 in this set" in text
    both = format_table({**bin_results, "targets": bin_results["targets"] + _folder_results()["targets"],
                         "kinds": {"model": "student", "teacher": "teacher"}})
    assert both.index("lfw.bin") < both.index("cos thr")  # one table per set, in order


def test_tar_note_says_what_would_fill_a_dash():
    from distill.evaluate.run import tar_note

    sampled = {"kind": "folders", "impostor_pairs": 1000, "all_impostor_pairs": False}
    note = tar_note({**sampled, "impostor_pairs_available": 78000})
    assert "1e-03 needs 10,000 and 1e-04 needs 100,000, there are 1,000" in note
    assert "--pairs 20000 supports 1e-03" in note and "cannot support 1e-04: more identities or images" in note
    note = tar_note({**sampled, "impostor_pairs_available": 500_000})
    assert "--pairs 200000 supports 1e-04" in note and "cannot" not in note
    note = tar_note({**sampled, "impostor_pairs_available": 5000})
    assert "--pairs" not in note and "the folder's 5,000 distinct impostor pairs cannot support 1e-03 or 1e-04" in note
    note = tar_note({"kind": "folders", "impostor_pairs": 300, "impostor_pairs_available": 300,
                     "all_impostor_pairs": True})
    assert "every distinct impostor pair of this folder" in note and "--pairs" not in note
    assert tar_note({"kind": "folders", "impostor_pairs": 100_000}).endswith("(here 100,000)")


def test_folders_that_cannot_make_pairs_are_refused_with_the_fix(tmp_path):
    from distill.heldout import check_readable

    flat = tmp_path / "flat"
    flat.mkdir()
    for k in range(3):
        (flat / f"{k}.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"--folders .*flat holds 3 images directly and no identity sub-folders"):
        scan_folders(str(flat))
    (flat / "alice").mkdir()
    (flat / "alice" / "1.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"has 1 identity sub-folder\(s\) with images \(alice\): .* at least two people"):
        scan_folders(str(flat))
    (flat / "bob").mkdir()
    (flat / "bob" / "1.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="no identity has two images"):
        scan_folders(str(flat))
    (flat / "bob" / "2.jpg").write_bytes(b"also not a JPEG")
    paths, _, _ = scan_folders(str(flat))
    with pytest.raises(ValueError, match=r"none of its 3 images can be decoded \(.*alice/1.jpg: "):
        check_readable(str(flat), paths)
    with pytest.raises(ValueError, match="none of 2 of its 3 images"):
        check_readable(str(flat), paths, tries=2)
    from PIL import Image

    Image.new("L", (8, 8)).save(flat / "bob" / "2.jpg")
    check_readable(str(flat), paths)  # one readable image is enough here


def test_flip_test_is_named_for_what_it_does_and_flip_still_reads():
    from distill.cli import build_parser
    from distill.options import config_from_args

    def cfg(*extra):
        return config_from_args(EvaluateConfig, build_parser().parse_args(["evaluate", "m", "--folders", "d", *extra]))

    assert not cfg().flip_test
    assert cfg("--flip-test").flip_test and cfg("--flip").flip_test
    assert not cfg("--flip", "--no-flip-test").flip_test


def test_model_dir_accepts_an_export_directory(tmp_path):
    from distill.evaluate.run import resolve_model_dir

    (tmp_path / "export" / "saved_model").mkdir(parents=True)
    (tmp_path / "export" / "saved_model" / "saved_model.pb").write_bytes(b"")
    assert resolve_model_dir(str(tmp_path / "export")) == str(tmp_path / "export" / "saved_model")
    assert resolve_model_dir(str(tmp_path / "export" / "saved_model")) == str(tmp_path / "export" / "saved_model")
    with pytest.raises(FileNotFoundError, match="distill export"):
        resolve_model_dir(str(tmp_path))


def test_remap_pairs_follows_embedded_rows_and_drops_missing_images():
    from distill.evaluate.run import remap_pairs

    i, j = np.array([0, 0, 2, 3]), np.array([2, 1, 3, 4])
    same = np.array([True, False, True, False])
    embedded = np.array([0, 2, 3, 4])  # image 1 was unreadable
    ri, rj, s = remap_pairs(i, j, same, embedded, 5)
    assert ri.tolist() == [0, 1, 2] and rj.tolist() == [1, 2, 3]
    assert s.tolist() == [True, True, False]


def test_recorded_preprocessing_wins_and_an_option_that_differs_is_refused():
    from distill.errors import IncompatibleRun
    from distill.evaluate.run import TeacherRecord, choose_preprocessing
    from distill.teacher import Preprocessing

    rec = TeacherRecord("RUN/shards/manifest.json", "t", "f" * 64, Preprocessing(0.0, 255.0, "BGR"), "serving_default", "emb")
    none = {"pixel_mean": None, "pixel_scale": None, "channel_order": None}
    assert choose_preprocessing(rec, none) == rec.preprocessing
    assert choose_preprocessing(rec, {**none, "pixel_scale": 255.0, "channel_order": "BGR"}) == rec.preprocessing
    with pytest.raises(IncompatibleRun, match=r"--pixel-mean 127.5 \(recorded: 0.0\), --channel-order RGB \(recorded: BGR\)"):
        choose_preprocessing(rec, {**none, "channel_order": "RGB", "pixel_mean": 127.5})
    assert choose_preprocessing(None, none) == Preprocessing()
    assert choose_preprocessing(None, {**none, "pixel_scale": 1.0}) == Preprocessing(127.5, 1.0, "RGB")


def test_the_roc_curve_agrees_with_tar_at_far_at_every_point():
    from distill.evaluate.plot import axis_decades
    from distill.metrics import roc_curve, tar_at_far

    rng = np.random.default_rng(5)
    same = rng.random(4000) < 0.3
    scores = np.where(same, rng.normal(0.6, 0.2, 4000), rng.normal(0.1, 0.2, 4000))
    far, tar = roc_curve(scores, same, points=40)
    n_impostor = int((~same).sum())
    assert far[0] == pytest.approx(1 / n_impostor) and far[-1] == 1.0 and tar[-1] == 1.0
    assert np.all(np.diff(far) > 0) and np.all(np.diff(tar) >= 0)
    for f, t in zip(far[:-1], tar[:-1]):
        want = tar_at_far(scores, same, f) if f * n_impostor >= 10 else None
        if want is not None:
            assert t == pytest.approx(want)
    assert axis_decades(far[0]) == [-4, -3, -2, -1, 0]
