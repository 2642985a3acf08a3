"""saved_model.pb read without TensorFlow gives the signatures TensorFlow's own loader gives."""

from __future__ import annotations

import pytest
from support import MOBILEFACENET, build_tiny_teacher

from distill.savedmodel import SavedModelError, read_signatures
from distill.teacher import TeacherError, inspect_teacher

pytestmark = pytest.mark.integration


def _as_tf_sees_it(path: str) -> dict:
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    out = {}
    for name, fn in loaded.signatures.items():
        _, kwargs = fn.structured_input_signature

        def sig(spec):
            shape = None if spec.shape.rank is None else tuple(spec.shape.as_list())
            return (spec.dtype.name, shape)

        out[name] = ({k: sig(v) for k, v in kwargs.items()}, {k: sig(v) for k, v in fn.structured_outputs.items()})
    return out


def _as_read(path: str) -> dict:
    return {name: ({k: (t.dtype, t.shape) for k, t in s.inputs.items()}, {k: (t.dtype, t.shape) for k, t in s.outputs.items()})
            for name, s in read_signatures(path).items()}


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    """Signatures of every shape the checks care about, saved by TensorFlow itself."""
    import tensorflow as tf

    root = tmp_path_factory.mktemp("models")

    class Odd(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([8, 112, 112, 3], tf.float32, name="input")])
        def fixed(self, x):
            return {"embeddings": tf.reduce_mean(x, axis=[1, 2])}

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="pixels")])
        def free(self, x):
            x = tf.cast(x, tf.float32)
            return {"embedding": tf.reduce_mean(x, axis=[1, 2]), "norm": tf.reduce_sum(x, axis=[1, 2, 3]),
                    "logits": tf.zeros([tf.shape(x)[0], 5], tf.float16)}

        @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="anything"),
                                      tf.TensorSpec([None], tf.int64, name="ids")])
        def two(self, x, ids):
            return {"out": x}

    m = Odd()
    path = root / "odd"
    tf.saved_model.save(m, str(path), signatures={"serving_default": m.fixed.get_concrete_function(),
                                                  "free": m.free.get_concrete_function(),
                                                  "two": m.two.get_concrete_function()})
    return {"odd": str(path), "tiny": str(build_tiny_teacher(root / "tiny", dim=16, size=48)), "mobilefacenet": str(MOBILEFACENET)}


@pytest.mark.parametrize("name", ["mobilefacenet", "tiny", "odd"])
def test_signatures_match_tensorflows_loader(odd_models, name):
    assert _as_read(odd_models[name]) == _as_tf_sees_it(odd_models[name])


def test_inspection_refuses_what_the_actors_cannot_feed(odd_models):
    odd = odd_models["odd"]
    with pytest.raises(TeacherError, match=r"fixed batch size 8 \(shape \[8, 112, 112, 3\]\)"):
        inspect_teacher(odd)
    with pytest.raises(TeacherError, match="no fixed height/width"):
        inspect_teacher(odd, signature="free")
    with pytest.raises(TeacherError, match="takes 2 inputs"):
        inspect_teacher(odd, signature="two")
    spec = inspect_teacher(odd_models["tiny"])
    assert (spec.height, spec.width, spec.embedding_dim) == (48, 48, 16)


def test_a_damaged_saved_model_pb_is_a_clear_error(tmp_path, odd_models):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(odd_models["tiny"], bad)
    data = (bad / "saved_model.pb").read_bytes()
    (bad / "saved_model.pb").write_bytes(data[: len(data) // 2])  # a copy cut short
    with pytest.raises(SavedModelError, match="saved_model.pb is not a readable SavedModel"):
        read_signatures(str(bad))
    with pytest.raises(TeacherError, match="re-export the teacher"):
        inspect_teacher(str(bad))
