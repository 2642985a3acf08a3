"""Image preparation and teacher input conventions (no Ray, no TensorFlow)."""

import io

import numpy as np
import pytest
from conftest import MOBILEFACENET, ORL
from PIL import Image

from distill.images import UnreadableImage, decode_rgb, fit, prepare, read_file
from distill.teacher import Preprocessing, inspect_teacher, teacher_fingerprint


def encode(arr, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_grey_pgm_is_converted_and_resized_losslessly():
    data = (ORL / "s1" / "1.pgm").read_bytes()
    px, stored = prepare(data, 112, 112)
    assert px.shape == (112, 112, 3) and px.dtype == np.uint8
    assert np.array_equal(px[..., 0], px[..., 2])  # grey -> equal channels
    assert stored[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(decode_rgb(stored), px)  # stored bytes are exactly the teacher's pixels


def test_right_size_jpeg_and_png_are_kept_as_is():
    rgb = np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    for fmt in ("JPEG", "PNG"):
        data = encode(rgb, fmt)
        px, stored = prepare(data, 112, 112)
        assert stored is data and px.shape == (112, 112, 3)
    big = encode(np.zeros((120, 100, 3), np.uint8), "JPEG")
    px, stored = prepare(big, 112, 112)
    assert stored != big and px.shape == (112, 112, 3)


def test_bgr_and_scale_conventions():
    x = np.zeros((1, 2, 2, 3), np.uint8)
    x[..., 0] = 255
    rgb = Preprocessing().apply(x)
    bgr = Preprocessing(channel_order="BGR").apply(x)
    assert rgb[0, 0, 0, 0] == pytest.approx(127.5 / 128) and rgb[0, 0, 0, 2] == pytest.approx(-127.5 / 128)
    assert bgr[0, 0, 0, 2] == pytest.approx(127.5 / 128)
    raw = Preprocessing(pixel_mean=0, pixel_scale=1).apply(x)
    assert raw.max() == 255.0
    with pytest.raises(ValueError, match="channel-order"):
        Preprocessing(channel_order="GBR")


@pytest.mark.parametrize(
    "data,reason",
    [(b"", "empty"), (b"hello, not an image", "not an image"), (b"\xff\xd8\xff\xe0" + b"\0" * 20, "corrupt|truncated|not an image")],
)
def test_bad_bytes_are_unreadable_with_a_reason(data, reason):
    with pytest.raises(UnreadableImage, match=reason):
        prepare(data, 112, 112)


def test_truncated_jpeg_and_missing_file(tmp_path):
    data = encode(np.random.default_rng(1).integers(0, 255, (112, 112, 3), dtype=np.uint8), "JPEG", quality=95)
    with pytest.raises(UnreadableImage, match="truncated|corrupt"):
        prepare(data[: len(data) // 2], 112, 112)
    with pytest.raises(UnreadableImage, match="missing"):
        read_file(str(tmp_path / "nope.jpg"))
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(UnreadableImage, match="empty"):
        read_file(str(tmp_path / "zero.jpg"))


def test_fit_is_identity_at_size():
    a = np.ones((112, 112, 3), np.uint8)
    assert fit(a, 112, 112) is a
    assert fit(a, 56, 60).shape == (56, 60, 3)


def test_real_teacher_signature_is_read_from_the_model():
    spec = inspect_teacher(str(MOBILEFACENET))
    assert (spec.input_name, spec.output_name, spec.height, spec.width, spec.embedding_dim) == ("input", "embeddings", 112, 112, 192)
    assert teacher_fingerprint(str(MOBILEFACENET)) == teacher_fingerprint(str(MOBILEFACENET))
