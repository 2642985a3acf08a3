"""Augmented teacher views: the same pixels on the teacher's side and on the student's.

"A good teacher is patient and consistent": distillation works best when the student is
trained towards the teacher's output on exactly the image the student sees. With an offline
teacher that means ``distill embed --views K`` stores the teacher's embedding of K augmented
views of every image, and ``distill train`` regenerates exactly those pixels. Both sides call
the two functions here:

- ``view_params(spec, index, view)``: a pure function of (seed, listing index, view number)
  that gives each view's crop box, mirror and colour jitter. Counter-based hashing, no RNG
  state, so any row's view is known without the rows before it.
- ``render(images, params)``: uint8 -> uint8 with NumPy elementwise float32 arithmetic and
  an integer-exact mean, so the result is bit-identical whether one image or a batch is
  rendered, in the embed actor or in a ``tf.data`` pipeline, on any machine (IEEE float32
  add/multiply are exactly rounded; nothing is summed in floating point; NumPy never fuses
  a multiply-add).

``choose_views`` picks, per (seed, epoch, listing index), which view (or the plain image)
the student trains on in an epoch. Hands on: params to the embed actor and the stream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from distill.errors import BadOption

_M64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN = 0x9E3779B97F4A7C15
# Salts keep the hash streams of different decisions apart.
_PARAMS_SALT, _CHOICE_SALT = 0x5EED0F1E3, 0xC401CE
_DRAWS = 9  # scale, aspect, centre y, centre x, mirror, brightness, contrast, saturation, grey
# ITU-R BT.601 luma, in thousandths so the image mean is an exact integer sum.
_LUMA_MILLI = (299, 587, 114)


@dataclass(frozen=True)
class ViewSpec:
    """How the K views of every image are drawn. Recorded in the shard manifest."""

    count: int = 0  # views per image; 0: none
    seed: int = 0
    scale: tuple[float, float] = (0.8, 1.0)  # crop side as a fraction of the image side
    aspect: float = 0.1  # crop aspect ratio jitter: log-uniform in [1/(1+a), 1+a]
    shift: float = 0.06  # crop centre shift, fraction of the side (kept inside the image)
    flip: float = 0.5  # probability of mirroring
    brightness: float = 0.12  # added, as a fraction of 255: uniform in [-b, b]
    contrast: float = 0.2  # factor log-uniform in [1/(1+c), 1+c], around the image's mean luma
    saturation: float = 0.3  # factor log-uniform in [1/(1+s), 1+s]
    grey: float = 0.1  # probability of a grey view

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if self.count < 0:
            raise BadOption(f"--views must be >= 0, got {self.count}")
        if self.seed < 0:
            raise BadOption(f"--view-seed must be >= 0, got {self.seed}")
        if not 0 < lo <= hi <= 1:
            raise BadOption(f"--view-scale must satisfy 0 < LO <= HI <= 1, got {lo},{hi}")
        for name in ("aspect", "shift", "brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise BadOption(f"view {name} must be >= 0, got {getattr(self, name)}")
        for name in ("flip", "grey"):
            if not 0 <= getattr(self, name) <= 1:
                raise BadOption(f"view {name} is a probability in [0, 1], got {getattr(self, name)}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"] = list(self.scale)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ViewSpec":
        return cls(**{**d, "scale": tuple(d["scale"])})


# ---------------------------------------------------------------------------------------
# Counter-based uniforms: hash(seed, salt, a, b, draw) -> [0, 1), vectorised, no state.


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser; uint64 arithmetic wraps, which is the point."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, salt: int, a: np.ndarray, b: np.ndarray, draws: int) -> np.ndarray:
    """[n, draws] float64 uniforms in [0, 1), a pure function of (seed, salt, a[i], b[i], j)."""
    a = np.asarray(a, np.int64).astype(np.uint64)
    b = np.asarray(b, np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix(np.full(a.shape, (seed * _GOLDEN + salt) & _M64, np.uint64))
        h = _mix(h + a * np.uint64(_GOLDEN))
        h = _mix(h ^ (b + np.uint64(1)) * np.uint64(0xD1B54A32D192ED03))
        j = np.arange(1, draws + 1, dtype=np.uint64) * np.uint64(_GOLDEN)
        bits = _mix(h[:, None] + j[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ---------------------------------------------------------------------------------------
# View parameters (pure).


@dataclass(frozen=True)
class ViewParams:
    """Per image: crop box in pixels (y0, x0, height, width), mirror, colour jitter."""

    box: np.ndarray  # float64 [n, 4]
    mirror: np.ndarray  # bool [n]
    brightness: np.ndarray  # float32 [n], in pixel levels
    contrast: np.ndarray  # float32 [n]
    saturation: np.ndarray  # float32 [n]
    grey: np.ndarray  # bool [n]

    def __len__(self) -> int:
        return len(self.mirror)

    def take(self, rows) -> "ViewParams":
        return ViewParams(*(getattr(self, f)[rows] for f in ("box", "mirror", "brightness", "contrast", "saturation", "grey")))


def _log_uniform(u: np.ndarray, spread: float) -> np.ndarray:
    r = np.log1p(spread)
    return np.exp((2 * u - 1) * r)


def view_params(spec: ViewSpec, index: np.ndarray, view: np.ndarray | int, size: tuple[int, int]) -> ViewParams:
    """The parameters of view ``view`` of listing rows ``index`` for images of ``size`` (h, w). Pure."""
    index = np.asarray(index, np.int64).reshape(-1)
    view = np.broadcast_to(np.asarray(view, np.int64), index.shape)
    u = uniforms(spec.seed, _PARAMS_SALT, index, view, _DRAWS)
    height, width = size
    lo, hi = spec.scale
    side = lo + (hi - lo) * u[:, 0]
    ratio = _log_uniform(u[:, 1], spec.aspect)
    bh = np.minimum(side * np.sqrt(ratio), 1.0)
    bw = np.minimum(side / np.sqrt(ratio), 1.0)
    # Centre shifted, then kept so the box stays inside the image: no invented borders.
    cy = np.clip(0.5 + spec.shift * (2 * u[:, 2] - 1), bh / 2, 1 - bh / 2)
    cx = np.clip(0.5 + spec.shift * (2 * u[:, 3] - 1), bw / 2, 1 - bw / 2)
    box = np.stack([(cy - bh / 2) * height, (cx - bw / 2) * width, bh * height, bw * width], axis=1)
    return ViewParams(
        box=box,
        mirror=u[:, 4] < spec.flip,
        brightness=((2 * u[:, 5] - 1) * spec.brightness * 255.0).astype(np.float32),
        contrast=_log_uniform(u[:, 6], spec.contrast).astype(np.float32),
        saturation=_log_uniform(u[:, 7], spec.saturation).astype(np.float32),
        grey=u[:, 8] < spec.grey,
    )


def plain_params(mirror: np.ndarray, size: tuple[int, int]) -> ViewParams:
    """The identity view (whole image, no colour change), mirrored where asked."""
    mirror = np.asarray(mirror, bool).reshape(-1)
    n = len(mirror)
    h, w = size
    return ViewParams(
        box=np.tile(np.array([[0.0, 0.0, h, w]]), (n, 1)), mirror=mirror,
        brightness=np.zeros(n, np.float32), contrast=np.ones(n, np.float32),
        saturation=np.ones(n, np.float32), grey=np.zeros(n, bool),
    )


def choose_views(seed: int, epoch: int, index: np.ndarray, count: int, view_prob: float) -> np.ndarray:
    """Which stored view each sample trains on this epoch: 0..count-1, or -1 for the plain
    image (then mirrored or not by the stream's flip). Pure in (seed, epoch, index)."""
    index = np.asarray(index, np.int64).reshape(-1)
    if count <= 0 or view_prob <= 0:
        return np.full(index.shape, -1, np.int64)
    u = uniforms(seed, _CHOICE_SALT + epoch, index, np.zeros_like(index), 2)
    pick = np.minimum((u[:, 1] * count).astype(np.int64), count - 1)
    return np.where(u[:, 0] < view_prob, pick, -1)


# ---------------------------------------------------------------------------------------
# Rendering (NumPy, bit-exact).


def axis_taps(start: np.ndarray, length: np.ndarray, out: int, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps along one axis for every image: (low index, high index, high weight).

    Output pixel i samples the box at ``start + (i + 0.5) * length / out - 0.5`` (pixel
    centres at k + 0.5, as PIL and TF's half-pixel resize do). A whole-image box maps every
    output pixel onto its own input pixel with weight 0, so the plain view is exact.
    """
    pos = start[:, None] + (np.arange(out)[None, :] + 0.5) * (length[:, None] / out) - 0.5
    pos = np.clip(pos, 0.0, limit - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, limit - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def _resample(images: np.ndarray, box: np.ndarray, mirror: np.ndarray) -> np.ndarray:
    """Each image's box, bilinearly resampled to the image size, mirrored where asked."""
    n, h, w, _ = images.shape
    rows = np.arange(n)[:, None]
    y0, y1, wy = axis_taps(box[:, 0], box[:, 2], h, h)
    x0, x1, wx = axis_taps(box[:, 1], box[:, 3], w, w)
    src = images.astype(np.float32)
    # Separable bilinear: along y ([n, H, W_in, 3]), then along x ([n, W, H, 3]).
    top, bottom = src[rows, y0], src[rows, y1]
    col = top * (1 - wy)[:, :, None, None] + bottom * wy[:, :, None, None]
    left, right = col[rows, :, x0], col[rows, :, x1]
    out = np.transpose(left * (1 - wx)[:, :, None, None] + right * wx[:, :, None, None], (0, 2, 1, 3))
    out = np.where(mirror[:, None, None, None], out[:, :, ::-1], out)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render(images: np.ndarray, params: ViewParams) -> np.ndarray:
    """uint8 [n, H, W, 3] -> the views, uint8 [n, H, W, 3] (same size as the input)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"render takes uint8 [n, H, W, 3] images, got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    if len(params) != n:
        raise ValueError(f"{n} images but {len(params)} view parameters")
    if n == 0:
        return images.copy()
    geometric = np.where(params.mirror[:, None, None, None], images[:, :, ::-1], images)
    crop = np.flatnonzero(np.any(params.box != np.array([0.0, 0.0, h, w]), axis=1))
    if len(crop):  # whole-image boxes are exact copies: only the others are resampled
        geometric[crop] = _resample(images[crop], params.box[crop], params.mirror[crop])

    jitter = (params.brightness != 0) | (params.contrast != 1) | (params.saturation != 1) | params.grey
    if not jitter.any():
        return geometric
    result = geometric.copy()
    k = np.flatnonzero(jitter)
    g = geometric[k]
    luma_milli = g.astype(np.int64) @ np.asarray(_LUMA_MILLI, np.int64)  # [m, H, W], exact
    mean = (luma_milli.sum(axis=(1, 2)) / (1000.0 * h * w)).astype(np.float32)[:, None, None, None]
    luma = (luma_milli.astype(np.float32) / np.float32(1000))[..., None]
    x = g.astype(np.float32)
    x = luma + (x - luma) * params.saturation[k, None, None, None]
    x = np.where(params.grey[k, None, None, None], luma, x)
    x = (x - mean) * params.contrast[k, None, None, None] + mean + params.brightness[k, None, None, None]
    result[k] = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return result


# ---------------------------------------------------------------------------------------
# The same rendering in TensorFlow ops, for the trainer's input pipeline.
#
# ``render`` runs in NumPy on the teacher's side (the embed actor). The trainer renders every
# batch again, and NumPy there would hold the GIL inside ``tf.numpy_function``: one core's worth
# of input at most, taken from the training step. ``render_tf`` does the same IEEE float32
# operations in the same order (gathers, then one multiply and one add per tap; rint is
# round-half-to-even in both), so its pixels are bit-identical (tests/unit/test_views.py holds
# the two equal over random views); it runs in tf.data's threads, outside the GIL. The taps
# (which input pixels and weights each output pixel uses) are computed by ``axis_taps`` in
# NumPy, per sample, beside the other view parameters.


TAPS = ("y0", "y1", "wy", "x0", "x1", "wx")


@dataclass(frozen=True)
class Taps:
    """Bilinear taps of each image's box along y ([n, H]) and x ([n, W]): low, high, high weight."""

    y0: np.ndarray
    y1: np.ndarray
    wy: np.ndarray
    x0: np.ndarray
    x1: np.ndarray
    wx: np.ndarray


def taps(box: np.ndarray, size: tuple[int, int]) -> Taps:
    """The taps ``render`` resamples each box with, for images of ``size``. Pure."""
    h, w = size
    box = np.asarray(box, np.float64).reshape(-1, 4)
    y0, y1, wy = axis_taps(box[:, 0], box[:, 2], h, h)
    x0, x1, wx = axis_taps(box[:, 1], box[:, 3], w, w)
    return Taps(y0.astype(np.int32), y1.astype(np.int32), wy, x0.astype(np.int32), x1.astype(np.int32), wx)


def _add_f32(a, b):
    """float32 a + b, rounded once as float32 addition rounds it, which no graph rewrite can
    reassociate with a neighbouring add (the sum of two float32 of these magnitudes is exact in
    float64)."""
    import tensorflow as tf

    return tf.cast(tf.cast(a, tf.float64) + tf.cast(b, tf.float64), tf.float32)


def render_tf(images, t: dict, mirror, brightness, contrast, saturation, grey):
    """``render`` in TensorFlow: uint8 [n, H, W, 3] -> the same uint8 views, bit for bit.

    ``t`` holds the ``Taps`` fields as tensors (``y0``, ``y1``, ``wy``, ``x0``, ``x1``, ``wx``).
    """
    import tensorflow as tf

    src = tf.cast(images, tf.float32)
    wy, wx = t["wy"][:, :, None, None], t["wx"][:, None, :, None]
    top = tf.gather(src, t["y0"], axis=1, batch_dims=1)
    bottom = tf.gather(src, t["y1"], axis=1, batch_dims=1)
    col = top * (1 - wy) + bottom * wy
    left = tf.gather(col, t["x0"], axis=2, batch_dims=1)
    right = tf.gather(col, t["x1"], axis=2, batch_dims=1)
    out = left * (1 - wx) + right * wx
    out = tf.where(mirror[:, None, None, None], tf.reverse(out, [2]), out)
    geometric = tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

    shape = tf.shape(images)
    h, w = shape[1], shape[2]
    g = tf.cast(geometric, tf.int32)
    luma_milli = g[..., 0] * _LUMA_MILLI[0] + g[..., 1] * _LUMA_MILLI[1] + g[..., 2] * _LUMA_MILLI[2]  # exact
    total = tf.reduce_sum(tf.cast(luma_milli, tf.int64), axis=[1, 2])
    mean = tf.cast(tf.cast(total, tf.float64) / (1000.0 * tf.cast(h * w, tf.float64)), tf.float32)[:, None, None, None]
    # float32(a) / 1000 as NumPy divides it: in float64, then rounded once. (In a graph TensorFlow
    # may multiply by the reciprocal instead, which is off by an ulp in float32 but, for these
    # integers, never far enough in float64 to change the float32 result.)
    luma = tf.cast(tf.cast(luma_milli, tf.float64) / 1000.0, tf.float32)[..., None]
    x = tf.cast(geometric, tf.float32)
    x = luma + (x - luma) * saturation[:, None, None, None]
    x = tf.where(grey[:, None, None, None], luma, x)
    # ((x - mean) * contrast + mean) + brightness, in that order: in a graph TensorFlow would sum
    # mean + brightness first (same shape, so grouped), which rounds differently; each add is
    # done in float64 (exact for these values) and rounded to float32 once, as NumPy does it.
    x = _add_f32(_add_f32((x - mean) * contrast[:, None, None, None], mean), brightness[:, None, None, None])
    jittered = tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)
    jitter = (brightness != 0) | (contrast != 1) | (saturation != 1) | grey
    return tf.where(jitter[:, None, None, None], jittered, geometric)
