"""A teacher TensorFlow saved that the actors cannot use is refused when inspected, before any work."""

from __future__ import annotations

import pytest

from distill.teacher import TeacherError, inspect_teacher

pytestmark = pytest.mark.integration


def test_unusable_teachers_fail_before_work(tmp_path):
    import tensorflow as tf

    with pytest.raises(TeacherError, match="neither a TensorFlow SavedModel .* nor an ONNX file"):
        inspect_teacher(str(tmp_path))

    class Fixed(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([8, 112, 112, 3], tf.float32, name="input")])
        def serve(self, x):
            return {"embeddings": tf.reduce_mean(x, axis=[1, 2])}

    m = Fixed()
    tf.saved_model.save(m, str(tmp_path / "fixed"), signatures={"serving_default": m.serve.get_concrete_function()})
    with pytest.raises(TeacherError, match="fixed batch size 8"):
        inspect_teacher(str(tmp_path / "fixed"))
    with pytest.raises(TeacherError, match="no signature 'nope'"):
        inspect_teacher(str(tmp_path / "fixed"), signature="nope")
