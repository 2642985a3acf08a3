"""The synthetic teacher: a tiny TensorFlow net trained on the synthetic identities and exported
as a face teacher SavedModel."""

from __future__ import annotations

import os

import numpy as np
import pytest

from distill.synthetic import make_identity_dataset, render_image, train_synthetic_teacher

pytestmark = pytest.mark.integration


def test_tiny_teacher_trains_and_exports(tmp_path):
    from distill.teacher import Preprocessing, Teacher, inspect_teacher

    data = str(tmp_path / "faces")
    make_identity_dataset(data, identities=3, per_identity=4, size=32, seed=1)
    out = str(tmp_path / "teacher")
    report = train_synthetic_teacher(data, out, embedding_dim=8, epochs=2, batch_size=4, size=32, widths=(8, 16))
    assert report.classes == 3 and report.images == 12 and report.embedding_dim == 8
    correct = report.train_accuracy * 12  # of the last epoch's 12 images
    assert abs(correct - round(correct)) < 1e-5 and 0 <= round(correct) <= 12 and report.params > 0
    assert not os.path.exists(out + ".tmp")
    spec = inspect_teacher(out)
    assert (spec.input_name, spec.output_name) == ("input", "embeddings")
    assert (spec.height, spec.width, spec.embedding_dim) == (32, 32, 8)
    emb = Teacher(spec, Preprocessing())(np.stack([render_image(1, 0, 0, 32), render_image(1, 1, 0, 32)]))
    assert emb.shape == (2, 8) and np.all(np.isfinite(emb))
    assert not np.allclose(emb[0], emb[1])
    with pytest.raises(ValueError, match="already holds a SavedModel"):
        train_synthetic_teacher(data, out, embedding_dim=8, epochs=1, size=32, widths=(8, 16))
