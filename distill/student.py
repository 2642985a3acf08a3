"""The student: Keras 3 MobileNetV2 (no pretrained weights) + embedding head + classifier head.

Owns the architecture, built from a small frozen ``StudentSpec`` that is saved beside every
checkpoint, so export rebuilds exactly the trained graph. The model maps preprocessed float32
images [N, H, W, 3] to ``{"embedding": [N, D] raw, "logits": [N, C]}``. With the ArcFace
margin the logits are cosines between the normalised embedding and normalised class
weights; the margin and scale need the labels, so ``losses`` applies them. With the
``teacher`` margin those class weights are the teacher's class centres: not trained by
gradients, set and (optionally) updated by ``distill.centres``.
Hands on: the model to ``train``, and ``embedding_model`` (no classifier) to ``export``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from distill.errors import BadOption

HEADS = ("gdc", "gap")
MARGINS = ("softmax", "arcface", "teacher")


@dataclass(frozen=True)
class StudentSpec:
    input_size: tuple[int, int]
    embedding_dim: int
    num_classes: int
    width: float = 0.5
    head: str = "gdc"
    margin: str = "softmax"
    dropout: float = 0.2  # gap head only
    bn_momentum: float = 0.9  # Keras' MobileNetV2 uses 0.999: its inference stats lag for thousands of steps

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise BadOption(f"--head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.margin not in MARGINS:
            raise BadOption(f"--margin must be one of {', '.join(MARGINS)}, got {self.margin!r}")
        if self.width <= 0:
            raise BadOption(f"--width must be positive (e.g. 0.35, 0.5, 1.0), got {self.width}")
        h, w = self.input_size
        if h < 32 or w < 32:
            raise BadOption(f"MobileNetV2 needs inputs of at least 32x32; the shards are {h}x{w}")
        if self.embedding_dim <= 0 or self.num_classes <= 0:
            raise BadOption(f"embedding dim and classes must be positive, got {self.embedding_dim}, {self.num_classes}")

    @classmethod
    def from_json(cls, d: dict) -> "StudentSpec":
        return cls(**{**d, "input_size": tuple(d["input_size"])})


@lru_cache(maxsize=1)  # one class per process: Keras registers it by name
def _cosine_classifier():
    import keras

    @keras.saving.register_keras_serializable(package="distill")
    class CosineClassifier(keras.layers.Layer):
        """cos(embedding, class centre) for every class: the ArcFace head before its margin."""

        def __init__(self, num_classes: int, learned: bool = True, **kwargs):
            super().__init__(**kwargs)
            self.num_classes = num_classes
            self.learned = learned

        def build(self, input_shape):
            # Teacher centres are assigned from outside (under a distribution strategy every
            # replica computes the same update, so the first replica's value is kept).
            self.centres = self.add_weight(
                name="centres", shape=(input_shape[-1], self.num_classes), initializer="glorot_normal",
                trainable=self.learned, aggregation="mean" if self.learned else "only_first_replica",
            )

        def call(self, x):
            from keras import ops

            x = ops.cast(x, self.centres.dtype)
            x = x / ops.sqrt(ops.maximum(ops.sum(x * x, axis=1, keepdims=True), 1e-12))
            c = self.centres / ops.sqrt(ops.maximum(ops.sum(self.centres * self.centres, axis=0, keepdims=True), 1e-12))
            return ops.matmul(x, c)

        def get_config(self):
            return {**super().get_config(), "num_classes": self.num_classes, "learned": self.learned}

    return CosineClassifier


def build_student(spec: StudentSpec):
    """The training model. Every layer is named so checkpoints map variable to variable."""
    import keras
    from keras import layers

    h, w = spec.input_size
    inp = keras.Input((h, w, 3), name="image")
    base = keras.applications.MobileNetV2(
        input_shape=(h, w, 3), alpha=spec.width, include_top=False, weights=None, input_tensor=inp
    )
    for layer in base.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = spec.bn_momentum  # read at call time
    x = base.output
    if spec.head == "gdc":
        # Global depthwise conv: one learned weight per position and channel, unlike average
        # pooling, which treats the face's eyes and its background alike (MobileFaceNet).
        fh, fw = x.shape[1], x.shape[2]
        x = layers.DepthwiseConv2D((fh, fw), padding="valid", use_bias=False, name="gdc_dw")(x)
        x = layers.BatchNormalization(momentum=spec.bn_momentum, name="gdc_bn")(x)
        x = layers.Conv2D(spec.embedding_dim, 1, use_bias=False, name="gdc_proj")(x)
        x = layers.Flatten(name="gdc_flat")(x)
    else:
        x = layers.GlobalAveragePooling2D(name="gap")(x)
        x = layers.BatchNormalization(momentum=spec.bn_momentum, name="gap_bn")(x)
        x = layers.Dropout(spec.dropout, name="gap_dropout")(x)
        x = layers.Dense(spec.embedding_dim, use_bias=False, name="gap_proj")(x)
    # float32 outputs: under mixed precision the losses and the export stay in full precision.
    emb = layers.BatchNormalization(momentum=spec.bn_momentum, name="embedding", dtype="float32")(x)
    if spec.margin in ("arcface", "teacher"):
        logits = _cosine_classifier()(spec.num_classes, learned=spec.margin == "arcface", name="logits", dtype="float32")(emb)
    else:
        logits = layers.Dense(spec.num_classes, name="logits", dtype="float32")(emb)
    return keras.Model(inp, {"embedding": emb, "logits": logits}, name="student")


def embedding_model(model):
    """The embedding path only (shares the trained layers; no classifier)."""
    import keras

    return keras.Model(model.input, model.output["embedding"], name="student_embedding")
