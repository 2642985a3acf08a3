"""The objective: named parts, teacher and student not swapped, ArcFace margin, global averaging."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from distill.train.losses import LossSpec, arcface_logits, loss_parts

pytestmark = pytest.mark.integration


def _batch(seed=0, n=4, d=6, c=3):
    rng = np.random.default_rng(seed)
    f = lambda *s: tf.constant(rng.normal(size=s).astype(np.float32))  # noqa: E731
    return f(n, d), f(n, c), f(n, d), tf.constant(rng.integers(0, c, n), tf.int64)


def test_gradient_reaches_the_student_only_and_pulls_it_towards_the_teacher():
    student, logits, teacher, labels = _batch()
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([student, teacher])
        parts = loss_parts(student, logits, teacher, labels, LossSpec(ce_weight=0.0, distill_weight=1.0, distill="mse", contrast_weight=0.0,
                                                                     pair_weight=0.0))
    assert tape.gradient(parts["loss"], teacher) is None  # the teacher is a constant target
    g = tape.gradient(parts["loss"], student).numpy()
    np.testing.assert_allclose(g, 2 * (student - teacher).numpy() / student.numpy().size, rtol=1e-5)


def test_parts_are_named_and_weighted():
    student, logits, teacher, labels = _batch(1)
    p = loss_parts(student, logits, teacher, labels, LossSpec(ce_weight=0.3, distill_weight=2.0, distill="mse", contrast_weight=0.0,
                                                             pair_weight=0.0))
    assert set(p) == {"loss", "ce", "distill", "cos"}
    np.testing.assert_allclose(float(p["distill"]), np.mean((student.numpy() - teacher.numpy()) ** 2), rtol=1e-6)
    ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    np.testing.assert_allclose(float(p["ce"]), float(ce), rtol=1e-6)
    np.testing.assert_allclose(float(p["loss"]), 0.3 * float(p["ce"]) + 2.0 * float(p["distill"]), rtol=1e-6)


def test_cosine_distill_ignores_scale_and_global_batch_averages():
    student, logits, teacher, labels = _batch(2)
    spec = LossSpec(distill="cosine", ce_weight=0.0, contrast_weight=0.0)
    assert float(loss_parts(3.0 * teacher, logits, teacher, labels, spec)["distill"]) == pytest.approx(0.0, abs=1e-6)
    local = loss_parts(student, logits, teacher, labels, spec)
    half = loss_parts(student, logits, teacher, labels, spec, global_batch_size=8)  # this replica holds half of 8
    np.testing.assert_allclose(float(half["loss"]), float(local["loss"]) / 2, rtol=1e-6)


def test_normalised_mse_is_two_minus_two_cos_and_ignores_either_norm():
    student, logits, teacher, labels = _batch(3)
    spec = LossSpec(distill="nmse", ce_weight=0.0)
    base = float(loss_parts(student, logits, teacher, labels, spec)["distill"])
    assert float(loss_parts(5.0 * student, logits, 70.0 * teacher, labels, spec)["distill"]) == pytest.approx(base, rel=1e-5)
    cos = float(loss_parts(student, logits, teacher, labels, LossSpec(distill="cosine"))["distill"])
    assert base == pytest.approx(2 * cos, rel=1e-5)
    u = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    want = np.mean(np.sum((u(student.numpy()) - u(teacher.numpy())) ** 2, axis=1))
    assert base == pytest.approx(want, rel=1e-5)
    with tf.GradientTape() as tape:
        tape.watch(teacher)
        parts = loss_parts(student, logits, teacher, labels, spec)
    assert tape.gradient(parts["loss"], teacher) is None  # the teacher is never trained


def test_row_weights_follow_hardness_and_the_teacher_norm_with_mean_one_and_no_gradient():
    student, logits, teacher, labels = _batch(4, n=6)
    s = student.numpy() / np.linalg.norm(student.numpy(), axis=1, keepdims=True)
    t = teacher.numpy() / np.linalg.norm(teacher.numpy(), axis=1, keepdims=True)
    d = 2 - 2 * (s * t).sum(1)
    plain = float(loss_parts(student, logits, teacher, labels, LossSpec())["distill"])
    assert plain == pytest.approx(d.mean(), rel=1e-5)
    for power in (1.0, 2.0):
        w = d**power / (d**power).mean()
        assert float(loss_parts(student, logits, teacher, labels, LossSpec(distill_hardness=power))["distill"]) \
            == pytest.approx((w * d).mean(), rel=1e-5)
    # Rows further from the teacher than the mean gain weight: the weighted term exceeds the plain mean.
    assert (d / d.mean() * d).mean() > plain
    # The weights are constants of the step: the gradient is the plain one of each row, reweighted.
    w = tf.constant((d / d.mean()).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(student)
        hard = loss_parts(student, logits, teacher, labels, LossSpec(distill_hardness=1.0))["distill"]
        su = tf.math.l2_normalize(student, -1)
        fixed = tf.reduce_mean(w * (2.0 - 2.0 * tf.reduce_sum(su * tf.math.l2_normalize(teacher, -1), -1)))
    np.testing.assert_allclose(tape.gradient(hard, student).numpy(), tape.gradient(fixed, student).numpy(), rtol=1e-4, atol=1e-7)
    # Where the student is the teacher every term is 0 and nothing divides by 0.
    assert float(loss_parts(teacher, logits, teacher, labels, LossSpec(distill_hardness=1.0))["distill"]) == pytest.approx(0.0, abs=1e-6)
    # --distill-quality: the teacher embedding's norm weighs the row, alone or times the hardness.
    norm = np.linalg.norm(teacher.numpy(), axis=1)
    for spec, x in ((LossSpec(distill_quality=2.0), norm**2), (LossSpec(distill_hardness=1.0, distill_quality=1.0), d * norm)):
        assert float(loss_parts(student, logits, teacher, labels, spec)["distill"]) == pytest.approx((x / x.mean() * d).mean(), rel=1e-5)
    # A power that would overflow float32 (|t|^25 with norms near 100) still gives the weights, not nan.
    big = teacher * 100.0
    x = np.linalg.norm(big.numpy().astype(np.float64), axis=1) ** 25
    got = float(loss_parts(student, logits, big, labels, LossSpec(distill_quality=25.0, distill_hardness=200.0))["distill"])
    x = x * d.astype(np.float64) ** 200
    assert got == pytest.approx((x / x.mean() * d).mean(), rel=1e-4)
    # A unit-length teacher has no norm to give: the term is nMSE's, whatever the power.
    unit = tf.math.l2_normalize(teacher, -1)
    assert float(loss_parts(student, logits, unit, labels, LossSpec(distill_quality=3.0))["distill"]) == pytest.approx(plain, rel=1e-5)


def test_the_classifier_skips_unlabelled_rows():
    student, logits, teacher, _ = _batch(8, n=6)
    logits = 0.5 * tf.tanh(logits)  # cosine-like, so the ArcFace head is not saturated either
    labels = tf.constant([2, -1, 0, -1, 1, 2], tf.int64)  # -1: a face of no known identity
    for margin in ("softmax", "arcface"):
        spec = LossSpec(ce_weight=1.0, distill_weight=0.0, contrast_weight=0.0, pair_weight=0.0, margin=margin, arc_scale=8.0,
                        arc_margin=0.2)
        got = float(loss_parts(student, logits, teacher, labels, spec)["ce"])
        keep = np.array([0, 2, 4, 5])
        want = float(loss_parts(tf.gather(student, keep), tf.gather(logits, keep), tf.gather(teacher, keep),
                                tf.gather(labels, keep), spec)["ce"])
        assert got == pytest.approx(want, rel=1e-6)  # the mean over the labelled rows only
        with tf.GradientTape() as tape:
            tape.watch(logits)
            ce = loss_parts(student, logits, teacher, labels, spec)["ce"]
        g = tape.gradient(ce, logits).numpy()
        assert np.all(g[[1, 3]] == 0) and np.all(np.abs(g[keep]).sum(axis=1) > 0)
    none = tf.fill([6], tf.constant(-1, tf.int64))
    assert float(loss_parts(student, logits, teacher, none, LossSpec(ce_weight=1.0, distill_weight=1.0))["ce"]) == 0.0


def test_class_bias_takes_classes_out_of_the_softmax():
    student, logits, teacher, labels = _batch(4, c=3)
    labels = tf.constant([0, 1, 0, 1], tf.int64)
    spec = LossSpec(ce_weight=1.0, distill_weight=0.0, pair_weight=0.0)
    masked = loss_parts(student, logits, teacher, labels, spec, class_bias=tf.constant([0.0, 0.0, -1e4]))
    two = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits[:, :2]))
    assert float(masked["ce"]) == pytest.approx(float(two), rel=1e-5)


def test_arcface_adds_the_angle_margin_on_the_true_class_only():
    cos = tf.constant([[0.5, 0.2, -0.1]], tf.float32)
    out = arcface_logits(cos, tf.constant([0], tf.int64), scale=64.0, margin=0.5).numpy()[0]
    assert out[0] == pytest.approx(64 * math.cos(math.acos(0.5) + 0.5), rel=1e-5)
    np.testing.assert_allclose(out[1:], 64 * cos.numpy()[0, 1:], rtol=1e-6)
    far = arcface_logits(tf.constant([[-0.99]]), tf.constant([0], tf.int64), 64.0, 0.5).numpy()[0, 0]
    assert far == pytest.approx(64 * (-0.99 - 0.5 * math.sin(0.5)), rel=1e-5)  # past pi - m: linear stand-in


def test_bad_loss_options_say_which():
    with pytest.raises(ValueError, match="--distill-loss"):
        LossSpec(distill="kl")
    with pytest.raises(ValueError, match="not all 0"):
        LossSpec(ce_weight=0, distill_weight=0, contrast_weight=0, pair_weight=0)


def _infonce(s: np.ndarray, t: np.ndarray, temperature: float) -> np.ndarray:
    u = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    logits = u(s) @ u(t).T / temperature
    logits -= logits.max(axis=1, keepdims=True)
    return -(np.diag(logits) - np.log(np.exp(logits).sum(axis=1)))


def test_contrast_picks_each_target_out_of_the_batch_and_only_trains_the_student():
    student, logits, teacher, labels = _batch(5, n=6)
    spec = LossSpec(ce_weight=0.0, distill_weight=0.5, distill="nmse", contrast_weight=2.0, contrast_temperature=0.2,
                    pair_weight=0.0)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([student, teacher])
        p = loss_parts(student, logits, teacher, labels, spec)
    assert set(p) == {"loss", "distill", "contrast", "cos"}  # ce (weight 0) is not computed
    want = _infonce(student.numpy(), teacher.numpy(), 0.2).mean()
    assert float(p["contrast"]) == pytest.approx(want, rel=1e-5)
    assert float(p["loss"]) == pytest.approx(0.5 * float(p["distill"]) + 2.0 * want, rel=1e-5)
    assert tape.gradient(p["loss"], teacher) is None
    # Scale-free on both sides; the student's own target is the one it should be closest to.
    again = loss_parts(7.0 * student, logits, 70.0 * teacher, labels, spec)
    assert float(again["contrast"]) == pytest.approx(float(p["contrast"]), rel=1e-5)
    matched = loss_parts(teacher, logits, teacher, labels, spec)
    assert float(matched["contrast"]) < float(p["contrast"])
    assert set(loss_parts(student, logits, teacher, labels, LossSpec(ce_weight=0.0, contrast_weight=0.0, pair_weight=0.0))) == {"loss", "distill", "cos"}  # off: not computed


def _pair(s: np.ndarray, t: np.ndarray, temperature: float, focus: str = "student", cap: float = 1.0) -> np.ndarray:
    u = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    student_cos, teacher_cos = u(s) @ u(t).T, u(t) @ u(t).T
    focus_cos = student_cos if focus == "student" else teacher_cos
    out = np.zeros(len(s))
    for i in range(len(s)):
        others = [j for j in range(len(s)) if j != i]
        w = np.exp(focus_cos[i, others] / temperature)
        out[i] = (np.minimum(w / w.sum(), cap) * (student_cos[i, others] - teacher_cos[i, others]) ** 2).sum()
    return out


def test_pair_fits_the_teacher_cosines_of_the_student_hardest_impostors_and_only_trains_the_student():
    student, logits, teacher, labels = _batch(5, n=6)
    spec = LossSpec(distill_weight=0.5, contrast_weight=0.0, pair_weight=3.0, pair_temperature=0.2, pair_cap=1.0)  # (uncapped)
    with tf.GradientTape() as tape:
        tape.watch([student, teacher])
        p = loss_parts(student, logits, teacher, labels, spec)
    assert set(p) == {"loss", "distill", "pair", "cos"}
    want = _pair(student.numpy(), teacher.numpy(), 0.2).mean()
    assert float(p["pair"]) == pytest.approx(want, rel=1e-5)
    assert float(p["loss"]) == pytest.approx(0.5 * float(p["distill"]) + 3.0 * want, rel=1e-5)
    student_grad, teacher_grad = tape.gradient(p["loss"], [student, teacher])
    assert teacher_grad is None and float(tf.reduce_sum(tf.abs(student_grad))) > 0
    # Scale-free; 0 where the student holds the teacher's geometry (its own target excluded: a
    # student at 0.9 of every target's cosine to its own is not charged for that here).
    again = loss_parts(7.0 * student, logits, 70.0 * teacher, labels, spec)
    assert float(again["pair"]) == pytest.approx(float(p["pair"]), rel=1e-5)
    assert float(loss_parts(teacher, logits, teacher, labels, spec)["pair"]) == pytest.approx(0.0, abs=1e-7)
    # The weights follow the student: a lower temperature puts the term on its hardest impostors.
    cold = _pair(student.numpy(), teacher.numpy(), 0.01).mean()
    assert float(loss_parts(student, logits, teacher, labels, LossSpec(pair_weight=1.0, pair_temperature=0.01, pair_cap=1.0))["pair"]) \
        == pytest.approx(cold, rel=1e-4)
    one = loss_parts(student[:1], logits[:1], teacher[:1], labels[:1], spec)  # a batch of one has no pairs
    assert float(one["pair"]) == 0.0
    # --pair-focus teacher: the teacher's cosines weigh the pairs, whatever the student does.
    by_teacher = LossSpec(pair_weight=1.0, pair_temperature=0.05, pair_focus="teacher", pair_cap=1.0)
    want = _pair(student.numpy(), teacher.numpy(), 0.05, "teacher").mean()
    assert want != pytest.approx(_pair(student.numpy(), teacher.numpy(), 0.05).mean(), rel=1e-3)
    assert float(loss_parts(student, logits, teacher, labels, by_teacher)["pair"]) == pytest.approx(want, rel=1e-5)
    assert float(loss_parts(teacher, logits, teacher, labels, by_teacher)["pair"]) == pytest.approx(0.0, abs=1e-7)
    # --pair-cap: no pair weighs more than the cap, and the term shrinks where one pair held most of a row's.
    hot = LossSpec(pair_weight=1.0, pair_temperature=0.01, pair_cap=1.0)
    capped = LossSpec(pair_weight=1.0, pair_temperature=0.01, pair_cap=0.3)
    want = _pair(student.numpy(), teacher.numpy(), 0.01, cap=0.3).mean()
    assert want < float(loss_parts(student, logits, teacher, labels, hot)["pair"])
    assert float(loss_parts(student, logits, teacher, labels, capped)["pair"]) == pytest.approx(want, rel=1e-5)


def test_contrast_over_replicas_is_the_global_batch_term():
    """Two replicas (logical CPUs, a fresh process): each gathers the whole global batch's
    targets (and counts its labelled rows), so the summed per-replica parts equal one replica
    holding the whole batch."""
    code = textwrap.dedent("""
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from distill.train.losses import LossSpec, loss_parts
        rng = np.random.default_rng(0)
        s, t = (rng.normal(size=(8, 5)).astype(np.float32) for _ in range(2))
        logits = rng.normal(size=(8, 2)).astype(np.float32)
        lab = np.array([0, 1, -1, 0, -1, -1, 1, 1], np.int64)  # unlabelled rows spread unevenly over the replicas
        st = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        ds = st.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((s, logits, t, lab)).batch(8))
        for spec in (LossSpec(ce_weight=0.5, distill_weight=1.0, distill="nmse", contrast_weight=1.0, pair_weight=2.0),
                     LossSpec(distill_hardness=2.0, distill_quality=1.0, pair_weight=1.0, pair_cap=0.2)):  # (the row weights' mean is over the global batch too)
            one = loss_parts(s, logits, t, lab, spec, 8)
            fn = lambda a, l, b, c: loss_parts(a, l, b, c, spec, 8)
            for batch in ds:
                two = {k: float(st.reduce("SUM", v, axis=None)) for k, v in st.run(fn, args=batch).items()}
            assert set(two) == set(one)
            for k in two:
                assert abs(two[k] - float(one[k])) < 1e-5 * max(1.0, abs(float(one[k]))), (k, two[k], float(one[k]))
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_bad_contrast_options_say_which():
    with pytest.raises(ValueError, match="--contrast-temperature"):
        LossSpec(contrast_weight=1.0, contrast_temperature=0.0)
    with pytest.raises(ValueError, match="--pair-temperature must be > 0"):
        LossSpec(pair_weight=1.0, pair_temperature=-1.0)
    assert LossSpec(distill_weight=0, pair_weight=1.0).pair_weight == 1.0
    for power in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--distill-hardness is a power >= 0"):
            LossSpec(distill_hardness=power)
        with pytest.raises(ValueError, match="--distill-quality is a power >= 0"):
            LossSpec(distill_quality=power)
    for cap in (0.0, 1.5):
        with pytest.raises(ValueError, match="--pair-cap is a share"):
            LossSpec(pair_weight=1.0, pair_cap=cap)
    with pytest.raises(ValueError, match="--pair-focus must be one of student, teacher"):
        LossSpec(pair_weight=1.0, pair_focus="both")
    with pytest.raises(ValueError, match="not all 0"):
        LossSpec(ce_weight=0, distill_weight=0, contrast_weight=0, pair_weight=0)
    assert LossSpec(ce_weight=0, distill_weight=0, contrast_weight=1.0, pair_weight=0).contrast_weight == 1.0
