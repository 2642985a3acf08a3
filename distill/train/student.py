"""The student: MobileNetV2 or MobileFaceNet (no pretrained weights) + embedding head +
classifier head, with its pixel preprocessing inside.

Owns the architecture, built from a small frozen ``StudentSpec`` that is saved beside every
checkpoint, so export rebuilds exactly the trained graph. The model takes RGB pixels as they
are stored (uint8 or float 0..255, [N, H, W, 3]) and scales them in its first layer
(``pixels``: ``(x - 127.5) / 128``), so the stream, validation and export hand it pixels and
nobody else scales; it returns ``{"embedding": [N, D] raw, "logits": [N, C]}`` (no logits when
the shards hold no labelled identity). With the ArcFace margin the logits are cosines between
the normalised embedding and normalised class weights; the margin and scale need the labels,
so ``losses`` applies them. With the ``teacher`` margin those class weights are the
teacher's class centres: not trained by gradients, set and (optionally) updated by
``distill.train.centres``.

Backbones (``--student``):

- ``mobilenetv2``: Keras' MobileNetV2 (``--width`` alpha, default 0.5), stride 32.
- ``mobilefacenet``: the face-recognition mobile net (Chen et al., 2018; insightface ``mbf``,
  Keras_insightface ``mobilefacenet``), a MobileNetV2 descendant made for 112x112 faces: a
  stride-2 3x3 stem and a depthwise 3x3, then depthwise bottlenecks with PReLU (expansion,
  channels, repeats, stride) = (2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2),
  (2, 128, 2, 1), a 1x1 conv to 512: stride 16, a 7x7 map at 112x112 for the GDC head to
  weigh. About 1M parameters at ``--width 1`` (its default).

Heads: ``gdc`` (global depthwise conv + BN + 1x1 projection, MobileFaceNet's) or ``gap``.
Hands on: the model to ``train``, and ``embedding_model`` (no classifier) to ``export``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from distill.errors import BadOption

ARCHS = ("mobilenetv2", "mobilefacenet")
HEADS = ("gdc", "gap")
MARGINS = ("softmax", "arcface", "teacher")
DEFAULT_WIDTH = {"mobilenetv2": 0.5, "mobilefacenet": 1.0}
PIXEL_MEAN, PIXEL_SCALE = 127.5, 128.0  # the student's pixel contract, applied by its first layer
# MobileFaceNet's bottlenecks: (expansion, channels, repeats, first stride).
MFN_BLOCKS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))
MFN_STEM, MFN_LAST = 64, 512


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
    arch: str = "mobilenetv2"  # (checkpoints written before MobileFaceNet have none: MobileNetV2)
    resolution: int | None = None  # the backbone's input side: the model resizes its input to it (None: as given)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise BadOption(f"--student must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.head not in HEADS:
            raise BadOption(f"--head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.margin not in MARGINS:
            raise BadOption(f"--margin must be one of {', '.join(MARGINS)}, got {self.margin!r}")
        if self.width <= 0:
            raise BadOption(f"--width must be positive (e.g. 0.35, 0.5, 1.0), got {self.width}")
        h, w = self.input_size
        if h < 32 or w < 32:
            raise BadOption(f"the student needs inputs of at least 32x32; the shards are {h}x{w}")
        if self.resolution is not None and not 32 <= self.resolution <= max(h, w):
            raise BadOption(f"--resolution must be between 32 and the shards' image side ({max(h, w)}), got "
                            f"{self.resolution}")

    @property
    def working_size(self) -> tuple[int, int]:
        """The backbone's input size: ``resolution`` square, or the images' own size."""
        return (self.resolution, self.resolution) if self.resolution else self.input_size
        if self.embedding_dim <= 0 or self.num_classes < 0:
            raise BadOption(f"the embedding dim must be positive and the classes >= 0, got {self.embedding_dim}, "
                            f"{self.num_classes}")

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
    # The pixel contract travels with the model: (x - 127.5) / 128 (exact in float32 for 0..255).
    x = layers.Rescaling(1.0 / PIXEL_SCALE, offset=-PIXEL_MEAN / PIXEL_SCALE, name="pixels")(inp)
    if spec.working_size != (h, w):
        # A smaller working resolution: fewer FLOPs per image, the same 112x112 crops in and out.
        # Plain bilinear (no antialias): the one resize every TFLite runtime has.
        x = layers.Resizing(*spec.working_size, interpolation="bilinear", name="resolution")(x)
    x = _mobilefacenet(x, spec) if spec.arch == "mobilefacenet" else _mobilenetv2(x, spec)
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
    if spec.num_classes == 0:  # no labelled identity in the shards: no classifier
        return keras.Model(inp, {"embedding": emb}, name="student")
    if spec.margin in ("arcface", "teacher"):
        logits = _cosine_classifier()(spec.num_classes, learned=spec.margin == "arcface", name="logits", dtype="float32")(emb)
    else:
        logits = layers.Dense(spec.num_classes, name="logits", dtype="float32")(emb)
    return keras.Model(inp, {"embedding": emb, "logits": logits}, name="student")


def _mobilenetv2(x, spec: StudentSpec):
    """Keras' MobileNetV2 feature extractor on ``x``, with the spec's BatchNorm momentum."""
    import keras
    from keras import layers

    h, w = spec.working_size
    base = keras.applications.MobileNetV2(
        input_shape=(h, w, 3), alpha=spec.width, include_top=False, weights=None, input_tensor=x
    )
    for layer in base.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = spec.bn_momentum  # read at call time
    return base.output


def mfn_channels(n: int, width: float) -> int:
    """A MobileFaceNet channel count at ``width``: a multiple of 8, at least 8. Pure."""
    return max(8, int(round(n * width / 8)) * 8)


def _mobilefacenet(x, spec: StudentSpec):
    """MobileFaceNet's feature extractor (see the module docstring) on ``x``."""
    from keras import layers

    def unit(x, filters, kernel, stride, name, act=True, depthwise=False):
        if depthwise:
            x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{name}_dw")(x)
        else:
            x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(momentum=spec.bn_momentum, name=f"{name}_bn")(x)
        return layers.PReLU(shared_axes=[1, 2], name=f"{name}_prelu")(x) if act else x

    stem = mfn_channels(MFN_STEM, spec.width)
    x = unit(x, stem, 3, 2, "mfn_stem")
    x = unit(x, stem, 3, 1, "mfn_stem_dw", depthwise=True)
    cin, i = stem, 0
    for expansion, channels, repeats, stride in MFN_BLOCKS:
        cout = mfn_channels(channels, spec.width)
        for r in range(repeats):
            s = stride if r == 0 else 1
            y = unit(x, cin * expansion, 1, 1, f"mfn_b{i}_expand")
            y = unit(y, cin * expansion, 3, s, f"mfn_b{i}_dwise", depthwise=True)
            y = unit(y, cout, 1, 1, f"mfn_b{i}_project", act=False)
            x = layers.Add(name=f"mfn_b{i}_add")([x, y]) if s == 1 and cin == cout else y
            cin, i = cout, i + 1
    return unit(x, mfn_channels(MFN_LAST, spec.width), 1, 1, "mfn_last")


def embedding_model(model):
    """The embedding path only (shares the trained layers; no classifier)."""
    import keras

    return keras.Model(model.input, model.output["embedding"], name="student_embedding")
