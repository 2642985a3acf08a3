"""Image bytes -> uint8 RGB arrays at the teacher's size, and the bytes a shard stores.

Bad input is data, not a crash: every failure is an ``UnreadableImage`` with a short
reason (missing, empty, truncated, not an image) that the embed stage records per row.
"""

from __future__ import annotations

import io

import numpy as np

from distill.errors import BadInput
from distill.storage import is_uri

# Stored as-is when already in one of these at the right size: tf.io.decode_image reads them.
PASSTHROUGH_FORMATS = ("JPEG", "PNG")


class UnreadableImage(BadInput):
    """A row whose image cannot be used; ``reason`` is what the error record says."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_file(path: str) -> bytes:
    """The bytes of an image file, or of an object (``s3://...``: a listing of a folder or list
    on a store). A missing or empty one is a bad row; a store that does not answer after its
    retries is an error of the whole shard (retried, never recorded as a bad image)."""
    if is_uri(path):
        return _read_object(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UnreadableImage("missing file") from None
    except IsADirectoryError:
        raise UnreadableImage("is a directory") from None
    except OSError as e:
        raise UnreadableImage(f"cannot read: {e.strerror or e}") from None
    if not data:
        raise UnreadableImage("empty file")
    return data


def _read_object(uri: str) -> bytes:
    from distill.storage import read_store_bytes

    try:
        data = read_store_bytes(uri)
    except FileNotFoundError:
        raise UnreadableImage("missing object") from None
    if not data:
        raise UnreadableImage("empty object")
    return data


def _open(data: bytes):
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UnreadableImage("empty image bytes")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode fully now: a truncated file fails here, not later
    except UnidentifiedImageError:
        raise UnreadableImage("not an image (unknown format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e)
        reason = "truncated image" if "truncated" in msg.lower() else f"corrupt image: {msg}"
        raise UnreadableImage(reason) from None
    return img


def decode_rgb(data: bytes) -> np.ndarray:
    """Any format PIL reads (JPEG, PNG, PGM, BMP, ...) -> uint8 [H, W, 3] RGB."""
    return _to_rgb_array(_open(data))


def _to_rgb_array(img) -> np.ndarray:
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def fit(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 RGB to (height, width); unchanged when it already fits."""
    if img.shape[:2] == (height, width):
        return img
    from skimage.transform import resize

    out = resize(img, (height, width), order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def encode_png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def prepare(data: bytes, height: int, width: int) -> tuple[np.ndarray, bytes]:
    """The teacher's pixels and the bytes to store for training.

    The original bytes are kept when they already are JPEG/PNG at the teacher's size (no
    re-encoding loss, no extra CPU); anything else (other formats, sizes, CMYK, ...) is
    converted and stored as lossless PNG of exactly the pixels the teacher saw.
    """
    img = _open(data)
    keep = img.format in PASSTHROUGH_FORMATS and img.size == (width, height) and img.mode in ("RGB", "L")
    rgb = _to_rgb_array(img)
    if keep:
        return rgb, data
    rgb = fit(rgb, height, width)
    return rgb, encode_png(rgb)
