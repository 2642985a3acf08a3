"""Teacher class centres (streamed sums, AdaDistill's update rule) and the validation split."""

from __future__ import annotations

import numpy as np
import pytest

from distill.train.centres import ShardScan, accumulate, adaptive_update, unit
from distill.train.validate import BinSet, ValSet, heldout_classes, is_better, pairs_for, pick_samples, score, score_bin


def test_centres_are_the_mean_direction_of_each_class():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(30, 4)) * rng.uniform(1, 90, (30, 1))  # raw norms vary a lot
    labels = np.arange(30) % 3
    sums, counts = np.zeros((4, 4)), np.zeros(4, np.int64)
    for a in range(0, 30, 7):  # streamed in pieces, as over row groups
        accumulate(sums, counts, labels[a:a + 7], emb[a:a + 7])
    scan = ShardScan(labels, sums, counts)
    c = scan.centres()
    for k in range(3):
        want = unit(unit(emb[labels == k]).mean(axis=0))
        np.testing.assert_allclose(c[k], want, rtol=1e-5, atol=1e-6)
    assert np.all(c[3] == 0) and counts.tolist() == [10, 10, 10, 0]  # a class with no rows: no centre
    assert np.all(scan.centres(exclude_classes=np.array([1]))[1] == 0)  # held out: no centre either


def test_adaptive_update_follows_the_teacher_while_the_student_disagrees():
    centres = np.eye(3, 4)
    teacher = np.array([[0, 0, 0, 1.0], [0, 0, 0, 2.0]])
    labels = np.array([0, 0])
    # Student orthogonal to the teacher: alpha is ~0, the centre becomes the teacher's direction.
    out = adaptive_update(centres, np.array([[1.0, 0, 0, 0]] * 2), teacher, labels)
    np.testing.assert_allclose(out[0], [0, 0, 0, 1], atol=1e-5)
    np.testing.assert_array_equal(out[1:], centres[1:])  # classes not in the batch are untouched
    # Student and centre agree with the teacher: alpha is 1, the centre stays.
    agree = np.array([[0, 0, 0, 1.0]])
    np.testing.assert_allclose(adaptive_update(np.array([[0, 0, 0, 3.0]]), agree, agree, np.array([0])), [[0, 0, 0, 3.0]])


def test_unlabelled_rows_move_no_centre():
    centres = np.eye(3, 4)
    teacher = np.array([[0, 0, 0, 1.0], [0, 1.0, 0, 0]])
    out = adaptive_update(centres, np.array([[1.0, 0, 0, 0]] * 2), teacher, np.array([-1, 2]))
    np.testing.assert_array_equal(out[:2], centres[:2])  # the -1 row's teacher moved nothing
    np.testing.assert_allclose(out[2], [0, 1, 0, 0], atol=1e-5)


def test_scan_counts_labelled_rows_only(tmp_path):
    from toy_shards import write_toy_shards

    from distill.shards.reader import open_shards
    from distill.train.centres import scan_shards

    shards = open_shards(str(write_toy_shards(tmp_path / "s", rows=32, shard_size=16, classes=4, unlabelled=0.25)))
    scan = scan_shards(shards, centres=True)
    assert (scan.labels == -1).sum() == 8 and scan.counts.sum() == 24 and scan.counts.tolist() == [0, 8, 8, 8]
    assert np.all(scan.centres()[0] == 0)
    # --val-split holds out labelled identities only: the unlabelled rows are never in validation.
    held = heldout_classes(scan.counts, 0.5, 0)
    assert -1 not in held and set(held) <= {1, 2, 3}
    assert np.all(scan.labels[pick_samples(scan.labels, held, 100, 0)] >= 0)


def test_heldout_classes_are_seeded_and_sized():
    counts = np.array([50, 3, 0, 40, 1, 30, 20, 10, 9, 8])
    a = heldout_classes(counts, 0.34, seed=0)
    assert np.array_equal(a, heldout_classes(counts, 0.34, seed=0))
    assert len(a) == round(0.34 * 8) and set(a) <= set(np.flatnonzero(counts >= 2))
    assert len(heldout_classes(counts, 0.01, 0)) == 2  # verification needs two people at least
    assert len(heldout_classes(counts, 0.0, 0)) == 0
    with pytest.raises(ValueError, match="nothing to train on"):
        heldout_classes(np.array([5, 5]), 0.5, 0)


def test_pick_samples_caps_evenly_across_the_held_out_people():
    labels = np.array([0] * 100 + [1] * 5 + [2] * 50 + [3] * 10)
    got = pick_samples(labels, np.array([0, 1, 2]), 30, seed=0)
    assert np.array_equal(got, pick_samples(labels, np.array([0, 1, 2]), 30, seed=0))
    assert len(got) == 30 and np.all(np.diff(got) > 0) and set(labels[got]) == {0, 1, 2}
    assert (labels[got] == 1).sum() == 5  # the small identity is not crowded out
    assert len(pick_samples(labels, np.array([1, 3]), 100, 0)) == 15  # under the cap: all of them


def test_score_reads_verification_and_teacher_agreement():
    labels = np.repeat(np.arange(4), 5)
    teacher = np.eye(4, 6)[labels] * 70 + np.random.default_rng(0).normal(0, 1, (20, 6))
    val = ValSet("t", np.zeros((20, 8, 8, 3), np.uint8), labels, teacher, pairs_for(labels, 0))
    good = score(teacher / 70, val)
    assert good["val_auc"] > 0.99 and good["val_cos"] > 0.99 and good["val_accuracy"] > 0.95
    bad = score(np.random.default_rng(2).normal(size=(20, 6)), val)
    assert bad["val_auc"] < 0.8 and abs(bad["val_cos"]) < 0.5
    assert is_better(good, bad) and not is_better(bad, good) and is_better(bad, None)


def test_score_bin_is_insightfaces_protocol_on_flip_summed_embeddings():
    from distill.metrics import kfold_accuracy, roc_auc

    rng = np.random.default_rng(3)
    n = 60
    same = np.arange(n) % 2 == 0
    a = rng.normal(size=(n, 8))
    b = np.where(same[:, None], a + rng.normal(0, 0.3, (n, 8)), rng.normal(size=(n, 8)))
    emb = np.empty((2 * n, 8))
    emb[0::2], emb[1::2] = a, b
    flipped = emb + rng.normal(0, 0.1, emb.shape)
    got = score_bin(emb, flipped, BinSet("lfw", np.zeros((2 * n, 4, 4, 3), np.uint8), same))
    # By hand: sum, normalise, squared distance per pair, 10 folds.
    e = emb + flipped
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    dist = ((e[0::2] - e[1::2]) ** 2).sum(1)
    assert got["val_lfw_acc"] == pytest.approx(kfold_accuracy(dist, same)[0].mean())
    assert got["val_lfw_auc"] == pytest.approx(roc_auc(-dist, same)) and got["val_lfw_auc"] > 0.95


def test_the_best_is_chosen_by_the_named_figure_and_a_best_kept_by_another_is_beaten():
    lfw_good = {"val_auc": 0.80, "val_lfw_acc": 0.99}
    auc_good = {"val_auc": 0.90, "val_lfw_acc": 0.95}
    assert is_better(lfw_good, auc_good, "val_lfw_acc") and not is_better(lfw_good, auc_good, "val_auc")
    assert is_better({"val_lfw_acc": 0.5}, {"val_auc": 0.99}, "val_lfw_acc")  # (the best was kept by another figure)
