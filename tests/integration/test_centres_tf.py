"""AdaDistill's centre update in TensorFlow (the trainer's) against the numpy rule of distill.train.centres."""

from __future__ import annotations

import numpy as np
import pytest

from distill.train.centres import adaptive_update

pytestmark = pytest.mark.integration


def test_adaptive_update_in_tensorflow_matches_the_numpy_rule():
    import tensorflow as tf

    from distill.train.centres import adaptive_update_tf

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 8))
    student, teacher = rng.normal(size=(12, 8)), rng.normal(size=(12, 8)) * 50
    labels = np.where(np.arange(12) % 5 == 0, -1, rng.integers(0, 5, 12))  # some rows of no known identity
    want = adaptive_update(centres, student, teacher, labels)
    got = adaptive_update_tf(tf.constant(centres.T, tf.float32), tf.constant(student, tf.float32),
                             tf.constant(teacher, tf.float32), tf.constant(labels, tf.int64)).numpy().T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
