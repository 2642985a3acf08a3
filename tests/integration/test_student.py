"""The student model: MobileNetV2 + GDC/GAP embedding head + softmax/ArcFace classifier head."""

from __future__ import annotations

import numpy as np
import pytest

from distill.train.student import StudentSpec, build_student, embedding_model

pytestmark = pytest.mark.integration


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


def test_mobilefacenet_is_the_face_net_with_its_gdc_head():
    spec = StudentSpec(input_size=(112, 112), embedding_dim=128, num_classes=7, arch="mobilefacenet", width=1.0)
    model = build_student(spec)
    emb = embedding_model(model)
    assert 0.95e6 < emb.count_params() < 1.1e6  # MobileFaceNet's ~1M (0.99M at 128-d in the paper)
    assert tuple(model.get_layer("gdc_dw").input.shape[1:3]) == (7, 7)  # stride 16: a 7x7 map for the GDC to weigh
    assert model.get_layer("gdc_dw").kernel.shape[:2] == (7, 7)
    assert any(type(layer).__name__ == "PReLU" for layer in model.layers)
    adds = [layer.name for layer in model.layers if layer.name.endswith("_add")]
    assert len(adds) == 4 + 6 + 2  # the stride-1 repeats with equal channels are residual
    x = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3)).astype(np.uint8)
    out = model(x, training=False)
    assert tuple(out["embedding"].shape) == (2, 128) and tuple(out["logits"].shape) == (2, 7)
    half = build_student(StudentSpec((96, 96), 64, 7, arch="mobilefacenet", width=0.5))
    assert tuple(half.get_layer("gdc_dw").input.shape[1:3]) == (6, 6) and embedding_model(half).count_params() < 0.45e6



def test_a_working_resolution_resizes_inside_the_model():
    spec = StudentSpec((112, 112), 32, 0, arch="mobilefacenet", resolution=80)
    model = build_student(spec)
    assert tuple(model.input.shape[1:3]) == (112, 112)  # the shards' crops in, as exported
    assert tuple(model.get_layer("gdc_dw").input.shape[1:3]) == (5, 5)  # an 80x80 backbone (stride 16)
    x = np.random.default_rng(2).integers(0, 256, (2, 112, 112, 3)).astype(np.uint8)
    assert tuple(model(x, training=False)["embedding"].shape) == (2, 32)
    with pytest.raises(ValueError, match="--resolution"):
        StudentSpec((112, 112), 32, 0, resolution=128)


def test_the_student_scales_its_own_pixels_and_needs_no_classifier_without_labels():
    spec = StudentSpec(input_size=(32, 32), embedding_dim=8, num_classes=0, width=0.35)
    model = build_student(spec)
    assert set(model.output) == {"embedding"}  # no labelled rows: no classifier
    x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    scaled = model.get_layer("pixels")(x.astype(np.float32)).numpy()
    np.testing.assert_array_equal(scaled, (x.astype(np.float32) - 127.5) / 128)  # exact, as every stage fed it before
    np.testing.assert_array_equal(model(x, training=False)["embedding"].numpy(),
                                  model(x.astype(np.float32), training=False)["embedding"].numpy())


def test_spec_refuses_what_cannot_be_built():
    with pytest.raises(ValueError, match="--head"):
        StudentSpec((112, 112), 128, 10, head="flat")
    with pytest.raises(ValueError, match="at least 32x32"):
        StudentSpec((16, 16), 128, 10)
    assert StudentSpec.from_json({"input_size": [64, 64], "embedding_dim": 8, "num_classes": 2}).input_size == (64, 64)


def test_init_copies_a_keras_backbone_file_by_layer_name_and_says_so(tmp_path):
    import keras

    from distill.train.config import TrainConfig
    from distill.train.loop import _load_init

    spec = StudentSpec(input_size=(64, 64), embedding_dim=8, num_classes=3, width=0.35)
    keras.utils.set_random_seed(1)
    src = keras.applications.MobileNetV2(input_shape=(64, 64, 3), alpha=0.35, include_top=False, weights=None)
    path = tmp_path / "backbone.weights.h5"
    src.save_weights(path)
    model = build_student(spec)
    said = _load_init(model, spec, TrainConfig("s", "o", student="mobilenetv2", init=str(path)))
    assert "backbone from" in said
    np.testing.assert_array_equal(model.get_layer("Conv1").get_weights()[0], src.get_layer("Conv1").get_weights()[0])
    with pytest.raises(ValueError, match="--init"):
        _load_init(build_student(StudentSpec((64, 64), 8, 3, width=0.5)), StudentSpec((64, 64), 8, 3, width=0.5),
                   TrainConfig("s", "o", student="mobilenetv2", init=str(path)))  # a file of another width
