"""The pure parts of evaluate: pairs, ROC-AUC, best accuracy, the 10-fold protocol, and the
restricted unpickler of .bin files. No TensorFlow, no models."""

from __future__ import annotations

import os
import pickle
import subprocess

import numpy as np
import pytest

from distill.evaluate.run import EvaluateConfig, UnsafePickle, format_table, loads_bin, scan_folders
from distill.metrics import (
    BIN_THRESHOLDS,
    all_pairs,
    best_accuracy,
    best_distance_threshold,
    fold_bounds,
    kfold_accuracy,
    mean_cosine,
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


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n_pairs", [2, 7, 1000])
def test_sample_pairs_is_balanced_correct_and_seeded(seed, n_pairs):
    rng = np.random.default_rng(100 + seed)
    labels = rng.integers(0, 30, 500)
    labels[labels == 3] = 4  # a missing class id must not matter
    labels[0] = 99  # a class with a single image: never half of a same pair
    i, j, same = sample_pairs(labels, n_pairs, seed)
    assert len(i) == n_pairs
    assert same.sum() == n_pairs // 2
    assert np.array_equal(same, labels[i] == labels[j])
    assert np.all(i[same] != j[same])
    assert not np.any(i[same] == 0)
    again = sample_pairs(labels, n_pairs, seed)
    assert all(np.array_equal(a, b) for a, b in zip((i, j, same), again))


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


def test_mean_cosine_normalises_rows():
    a = np.array([[3.0, 0.0], [0.0, 2.0]])
    b = np.array([[1.0, 0.0], [5.0, 0.0]])
    assert mean_cosine(a, b) == pytest.approx(0.5)


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


def test_format_table_shows_each_model_and_the_cosine():
    results = {
        "dataset": {"kind": "folders", "path": "d", "images": 10, "identities": 2, "pairs": 45,
                    "same_pairs": 20, "impostor_pairs": 25, "sampled": False, "chance_accuracy": 0.5556},
        "models": {
            "model": {"auc": 0.91, "best_accuracy": 0.8, "threshold": 0.4, "images_per_second": 50.0,
                      "tar_at_far": {"1e-02": 0.625, "1e-03": None, "1e-04": None}},
            "teacher": {"auc": 0.97, "best_accuracy": 0.9, "threshold": 0.5, "images_per_second": 20.0},
        },
        "kinds": {"model": "student", "teacher": "teacher"},
        "mean_cosine": 0.8765,
    }
    text = format_table(results)
    assert "0.9100" in text and "0.9700" in text and "student" in text
    assert "mean teacher-student cosine: 0.8765" in text
    assert "TAR@1e-03" in text and "0.6250" in text and "25 impostor pairs are too few" in text


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
