"""The student model: MobileNetV2 + GDC/GAP embedding head + softmax/ArcFace classifier head."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from distill.student import StudentSpec, build_student, embedding_model  # noqa: E402


@pytest.mark.parametrize("head,margin", [("gdc", "softmax"), ("gap", "arcface")])
def test_heads_give_the_teacher_dim_and_class_logits(head, margin):
    spec = StudentSpec(input_size=(32, 40), embedding_dim=12, num_classes=5, width=0.35, head=head, margin=margin)
    model = build_student(spec)
    x = np.random.default_rng(0).normal(size=(3, 32, 40, 3)).astype(np.float32)
    out = model(x, training=False)
    assert tuple(out["embedding"].shape) == (3, 12) and tuple(out["logits"].shape) == (3, 5)
    if margin == "arcface":  # cosines: the margin and scale are the loss's job
        assert np.all(np.abs(out["logits"].numpy()) <= 1 + 1e-5)
    emb = embedding_model(model)
    assert "logits" not in [layer.name for layer in emb.layers]
    np.testing.assert_allclose(emb(x, training=False).numpy(), out["embedding"].numpy(), rtol=1e-5, atol=1e-6)


def test_spec_refuses_what_cannot_be_built():
    with pytest.raises(ValueError, match="--head"):
        StudentSpec((112, 112), 128, 10, head="flat")
    with pytest.raises(ValueError, match="at least 32x32"):
        StudentSpec((16, 16), 128, 10)
    assert StudentSpec.from_json({"input_size": [64, 64], "embedding_dim": 8, "num_classes": 2}).input_size == (64, 64)


def test_init_copies_a_keras_backbone_file_by_layer_name_and_says_so(tmp_path):
    import keras

    from distill.loop import _load_init
    from distill.train_config import TrainConfig

    spec = StudentSpec(input_size=(64, 64), embedding_dim=8, num_classes=3, width=0.35)
    keras.utils.set_random_seed(1)
    src = keras.applications.MobileNetV2(input_shape=(64, 64, 3), alpha=0.35, include_top=False, weights=None)
    path = tmp_path / "backbone.weights.h5"
    src.save_weights(path)
    model = build_student(spec)
    said = _load_init(model, spec, TrainConfig("s", "o", init=str(path)))
    assert "backbone from" in said
    np.testing.assert_array_equal(model.get_layer("Conv1").get_weights()[0], src.get_layer("Conv1").get_weights()[0])
    with pytest.raises(ValueError, match="--init"):
        _load_init(build_student(StudentSpec((64, 64), 8, 3, width=0.5)), StudentSpec((64, 64), 8, 3, width=0.5),
                   TrainConfig("s", "o", init=str(path)))  # a file of another width
