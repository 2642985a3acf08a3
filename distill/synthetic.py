"""Synthetic faces and a synthetic teacher: the demo's data with no downloads.

Owns two things the demo hands to the real pipeline:

- ``make_identity_dataset``: a folder tree (one folder per identity, JPEG files) whose
  identities are genuinely learnable. Each identity is a seeded, smooth "face-like" template
  (background, head, hair, eyes, brows, nose, mouth and a few marks, each with its own
  colour, size and place); each image renders that template under a seeded random pose
  (shift, scale, rotation), lighting (brightness, contrast, a gradient), sensor noise and,
  for some, a horizontal flip. Rendering is analytic (shapes evaluated at the inverse-posed
  pixel grid), so there is no interpolation and the bytes depend only on the seed.
- ``train_synthetic_teacher``: a small Keras ResNet with a cosine-softmax head trained
  briefly on such a tree, whose embedding part (before the classifier) is exported as a
  teacher SavedModel by ``distill.teacher.export_keras_teacher`` (input ``input`` float32
  [N,112,112,3] = (x-127.5)/128, output ``embeddings``), exactly like a real face teacher.

Identity ``k`` of seed ``s`` is the same template whatever ``first``/``identities`` are, so a
held-out set is simply other identity numbers.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np

from distill.errors import BadOption, IncompatibleRun

DATASET_MARKER = ".dataset.json"  # hidden: listings skip it, it is no image
FORMAT = "distill-synthetic-faces/1"


@dataclass(frozen=True)
class DatasetSpec:
    identities: int = 40
    per_identity: int = 20
    size: int = 112
    seed: int = 0
    first: int = 0  # number of the first identity: held-out sets use other numbers
    quality: int = 92

    def __post_init__(self) -> None:
        if self.identities < 1 or self.per_identity < 1:
            raise BadOption("identities and per_identity must be at least 1")
        if self.size < 32:
            raise BadOption(f"size must be at least 32 pixels, got {self.size}")


# ---------------------------------------------------------------------------------------
# Pure rendering: (seed, identity, image) -> pixels.

# A primitive: centre (x, y) and half-axes (a, b) in units of the image size, angle in
# radians, RGB colour 0..255, softness of the edge (in half-axis units), and whether it is a
# soft-edged ellipse or a Gaussian blob.
_PRIMITIVE = np.dtype(
    [("cx", "f8"), ("cy", "f8"), ("a", "f8"), ("b", "f8"), ("angle", "f8"), ("color", "f8", 3), ("soft", "f8"), ("gauss", "?")]
)


def identity_template(seed: int, identity: int) -> tuple[np.ndarray, np.ndarray]:
    """(background colour, primitives) of one identity: a seeded, face-like arrangement.

    The background colour is only a default: each image draws its own (see ``render_image``),
    so an identity is its face, not its backdrop."""
    rng = np.random.default_rng([seed, identity, 0x1D])
    prims = []

    def add(cx, cy, a, b, angle, color, soft=0.15, gauss=False):
        prims.append((cx, cy, a, b, angle, np.clip(color, 0, 255), soft, gauss))

    background = rng.uniform(20, 235, 3)
    skin = rng.uniform([90, 60, 40], [250, 210, 190])
    head_a, head_b = rng.uniform(0.26, 0.36), rng.uniform(0.33, 0.42)
    hair = rng.uniform(0, 200, 3) * rng.uniform(0.3, 1.0)
    hair_h = rng.uniform(0.12, 0.3)
    add(0.5, 0.52 - head_b + hair_h * 0.6, head_a * rng.uniform(1.0, 1.15), hair_h, 0.0, hair, 0.2)
    add(0.5, 0.53, head_a, head_b, 0.0, skin, 0.08)
    eye_dx, eye_y = rng.uniform(0.09, 0.16), rng.uniform(0.40, 0.50)
    eye_a, eye_b = rng.uniform(0.035, 0.065), rng.uniform(0.018, 0.04)
    iris = rng.uniform(0, 140, 3)
    tilt = rng.uniform(-0.35, 0.35)
    brow = hair * rng.uniform(0.5, 1.0)
    brow_dy, brow_tilt = rng.uniform(0.05, 0.09), rng.uniform(-0.4, 0.4)
    for side in (-1, 1):
        add(0.5 + side * eye_dx, eye_y, eye_a, eye_b, side * tilt, (235, 235, 235), 0.1)
        add(0.5 + side * eye_dx, eye_y, eye_b * 0.9, eye_b * 0.9, 0.0, iris, 0.1)
        add(0.5 + side * eye_dx, eye_y - brow_dy, eye_a * 1.2, 0.012, side * brow_tilt, brow, 0.3)
    nose_len = rng.uniform(0.04, 0.1)
    add(0.5, eye_y + 0.04 + nose_len / 2, rng.uniform(0.018, 0.04), nose_len, 0.0, skin * rng.uniform(0.6, 0.85), 0.5)
    mouth_y = rng.uniform(0.66, 0.76)
    add(0.5, mouth_y, rng.uniform(0.05, 0.12), rng.uniform(0.012, 0.035), 0.0, rng.uniform([120, 20, 30], [230, 110, 120]), 0.2)
    for _ in range(int(rng.integers(2, 6))):  # marks: the least "generic" part of a face
        add(rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.8), rng.uniform(0.02, 0.07), rng.uniform(0.02, 0.07),
            rng.uniform(0, np.pi), rng.uniform(0, 255, 3), 0.5, True)
    return background, np.array(prims, dtype=_PRIMITIVE)


def render(background: np.ndarray, prims: np.ndarray, size: int, pose: np.ndarray) -> np.ndarray:
    """Float RGB [size, size, 3] of a template seen under ``pose`` = (dx, dy, scale, angle),
    shifts in units of the image size."""
    # float32 with Python-float parameters: half the memory traffic of float64, same picture.
    dx, dy, scale, angle = (float(t) for t in pose)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    x = (xs + 0.5) / size - 0.5 - dx
    y = (ys + 0.5) / size - 0.5 - dy
    c, s = float(np.cos(-angle)), float(np.sin(-angle))
    u = (c * x - s * y) / scale + 0.5  # template coordinates of each output pixel
    v = (s * x + c * y) / scale + 0.5
    img = np.broadcast_to(np.asarray(background, np.float32), (size, size, 3)).copy()
    for p in prims:
        pc, ps = float(np.cos(p["angle"])), float(np.sin(p["angle"]))
        du, dv = u - float(p["cx"]), v - float(p["cy"])
        r2 = ((pc * du + ps * dv) / float(p["a"])) ** 2 + ((pc * dv - ps * du) / float(p["b"])) ** 2
        if p["gauss"]:
            alpha = np.exp(-2.0 * r2)
        else:  # a soft-edged ellipse: smooth, so a small CNN sees shapes, not aliasing
            z = (np.sqrt(r2) - 1.0) * (2.0 / max(float(p["soft"]), 1e-3))
            alpha = 0.5 - 0.5 * np.tanh(z)  # the logistic sigmoid of -2z, without overflow
        img += alpha[..., None] * (p["color"].astype(np.float32) - img)
    return img


def render_image(seed: int, identity: int, k: int, size: int) -> np.ndarray:
    """uint8 RGB [size, size, 3]: image ``k`` of ``identity``, all randomness from the seed."""
    _, prims = identity_template(seed, identity)
    rng = np.random.default_rng([seed, identity, k, 0x1A])
    background = rng.uniform(20, 235, 3)
    pose = np.array([rng.normal(0, 0.035), rng.normal(0, 0.035), rng.uniform(0.88, 1.12), rng.normal(0, 0.12)])
    img = render(background, prims, size, pose)
    contrast, brightness = rng.uniform(0.75, 1.25), rng.normal(0, 18)
    gx, gy = rng.normal(0, 25, 2)  # a lighting gradient across the face
    ramp = np.linspace(-0.5, 0.5, size)
    img = (img - 128.0) * contrast + 128.0 + brightness + gx * ramp[None, :, None] + gy * ramp[:, None, None]
    img += rng.normal(0, rng.uniform(2, 8), img.shape)
    if rng.random() < 0.3:
        img = img[:, ::-1]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# The folder tree.


def identity_name(identity: int) -> str:
    return f"id{identity:05d}"


def make_identity_dataset(
    out_dir: str,
    identities: int = 40,
    per_identity: int = 20,
    size: int = 112,
    seed: int = 0,
    first: int = 0,
    quality: int = 92,
) -> DatasetSpec:
    """Write ``out_dir/id{first..first+identities-1}/NNNN.jpg`` and ``.dataset.json`` last.

    Rerunning with the same arguments finds ``.dataset.json`` and returns at once; other
    arguments into the same directory are refused rather than mixed.
    """
    from PIL import Image
    from tqdm import tqdm

    spec = DatasetSpec(identities, per_identity, size, seed, first, quality)
    marker = os.path.join(out_dir, DATASET_MARKER)
    wanted = {"format": FORMAT, **asdict(spec)}
    if os.path.exists(marker):
        with open(marker) as f:
            have = json.load(f)
        if have != wanted:
            raise IncompatibleRun(
                f"{out_dir} already holds a synthetic dataset made with {have}; "
                "pass another directory or delete it to make a different one"
            )
        return spec
    os.makedirs(out_dir, exist_ok=True)
    with tqdm(total=identities * per_identity, desc="synthetic faces", unit="img", leave=False) as bar:
        for identity in range(first, first + identities):
            folder = os.path.join(out_dir, identity_name(identity))
            os.makedirs(folder, exist_ok=True)
            for k in range(per_identity):
                buf = io.BytesIO()
                Image.fromarray(render_image(seed, identity, k, size), "RGB").save(buf, format="JPEG", quality=quality)
                with open(os.path.join(folder, f"{k:04d}.jpg"), "wb") as f:
                    f.write(buf.getvalue())
                bar.update(1)
    # The marker is the "done" flag: written last, atomically.
    tmp = marker + ".tmp"
    with open(tmp, "w") as f:
        json.dump(wanted, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, marker)
    return spec


# ---------------------------------------------------------------------------------------
# The synthetic teacher.


@dataclass(frozen=True)
class TeacherReport:
    path: str
    classes: int
    images: int
    epochs: int
    embedding_dim: int
    train_accuracy: float
    seconds: float
    images_per_second: float
    params: int

    def to_json(self) -> dict:
        return asdict(self)


def load_folder_arrays(dataset_dir: str, size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, size, size, 3] images and int labels of a folder tree (labels: sorted names)."""
    from distill.heldout import scan_folders
    from distill.images import decode_rgb, fit, read_file

    paths, labels, _ = scan_folders(dataset_dir)
    images = np.stack([fit(decode_rgb(read_file(p)), size, size) for p in paths])
    return images, labels


def build_resnet(input_size: int, embedding_dim: int, widths: tuple[int, ...] = (32, 64, 128)):
    """A small ResNet: stride-2 stem, one residual block per width (each halving the size),
    global pooling, a linear embedding with batch norm. Returns the embedding model."""
    import keras
    from keras import layers

    # Training is a few hundred steps: Keras' default BN momentum (0.99) would leave the
    # inference statistics (what the exported teacher uses) partly at their initial values.
    def bn():
        return layers.BatchNormalization(momentum=0.9)

    def block(x, filters, stride):
        shortcut = x
        y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
        y = bn()(y)
        y = layers.ReLU()(y)
        y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
        y = bn()(y)
        if stride != 1 or shortcut.shape[-1] != filters:
            shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut)
            shortcut = bn()(shortcut)
        return layers.ReLU()(layers.Add()([y, shortcut]))

    inp = keras.Input((input_size, input_size, 3), name="input")
    x = layers.Conv2D(widths[0] // 2, 3, strides=2, padding="same", use_bias=False)(inp)
    x = bn()(x)
    x = layers.ReLU()(x)
    for w in widths:
        x = block(x, w, 2)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(embedding_dim, use_bias=False)(x)
    emb = layers.BatchNormalization(momentum=0.9, name="embedding")(x)
    return keras.Model(inp, emb, name="synthetic_teacher")


def _cosine_head(classes: int, scale: float):
    """Logits = scale * cos(embedding, class weight): a normalised softmax, which makes the
    cosine between embeddings the quantity training separates (what verification scores)."""
    import keras

    class CosineHead(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], classes), initializer="glorot_uniform", name="w")

        def call(self, x):
            x = keras.ops.normalize(x, axis=-1)
            w = keras.ops.normalize(self.w, axis=0)
            return scale * keras.ops.matmul(x, w)

    return CosineHead(name="classifier")


def train_synthetic_teacher(
    dataset_dir: str,
    out_dir: str,
    embedding_dim: int = 128,
    epochs: int = 6,
    seed: int = 0,
    batch_size: int = 32,
    size: int = 112,
    widths: tuple[int, ...] = (32, 64, 128),
    lr: float = 3e-3,
    verbose: int = 2,
) -> TeacherReport:
    """Train the ResNet + cosine-softmax on the folder tree, export its embedding part.

    The SavedModel appears at ``out_dir`` only when complete (written beside it, then renamed).
    """
    import keras

    from distill.teacher import export_keras_teacher

    if os.path.exists(os.path.join(out_dir, "saved_model.pb")):
        raise IncompatibleRun(f"{out_dir} already holds a SavedModel; pass another --out or delete it")
    keras.utils.set_random_seed(seed)
    images, labels = load_folder_arrays(dataset_dir, size)
    classes = int(labels.max()) + 1
    x = (images.astype(np.float32) - 127.5) / 128.0  # the teacher's contract: insightface scaling
    embedding = build_resnet(size, embedding_dim, widths)
    inp = keras.Input((size, size, 3))
    aug = keras.layers.RandomFlip("horizontal", seed=seed)(inp)  # real teachers see flips too
    aug = keras.layers.RandomTranslation(0.05, 0.05, fill_mode="nearest", seed=seed)(aug)
    logits = _cosine_head(classes, 16.0)(embedding(aug))
    model = keras.Model(inp, logits)
    steps = epochs * int(np.ceil(len(x) / batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(steps, 1), alpha=0.05)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    t0 = time.perf_counter()
    hist = model.fit(x, labels, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=verbose)
    seconds = time.perf_counter() - t0
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export_keras_teacher(embedding, tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return TeacherReport(
        path=out_dir,
        classes=classes,
        images=len(x),
        epochs=epochs,
        embedding_dim=embedding_dim,
        train_accuracy=float(hist.history["accuracy"][-1]),
        seconds=seconds,
        images_per_second=epochs * len(x) / max(seconds, 1e-9),
        params=int(embedding.count_params()),
    )
