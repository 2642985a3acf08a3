"""Teacher views rendered by TensorFlow (render_tf, the trainer's) are the numpy pixels bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from distill.views import ViewSpec, plain_params, render, view_params

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("size", [(112, 112), (40, 56)])
def test_tensorflow_rendering_gives_the_numpy_pixels_bit_for_bit(size):
    """The trainer renders with render_tf (outside the GIL); the teacher's side rendered with
    render: the pixels must be the same, every one of them."""
    from dataclasses import asdict

    import tensorflow as tf

    from distill.views import render_tf, taps

    rng = np.random.default_rng(7)
    h, w = size
    for case in range(5):
        imgs = rng.integers(0, 256, (24, h, w, 3)).astype(np.uint8)
        imgs[0] = 255  # saturated: clipping at the top
        imgs[1] = 0
        spec = ViewSpec(count=4, seed=case, scale=(0.3 + 0.1 * case, 1.0), grey=0.3, brightness=0.3, contrast=0.5,
                        saturation=0.8)
        p = view_params(spec, np.arange(24), rng.integers(0, 4, 24), size)
        if case == 4:  # plain and mirrored images, as a batch of the stream mixes them in
            plain = plain_params(rng.random(24) < 0.5, size)
            keep = np.arange(24) % 2 == 0
            p = type(p)(*(np.where(keep.reshape(-1, *[1] * (getattr(p, f).ndim - 1)), getattr(p, f), getattr(plain, f))
                          for f in ("box", "mirror", "brightness", "contrast", "saturation", "grey")))
        want = render(imgs, p)
        t = {k: tf.constant(v) for k, v in asdict(taps(p.box, size)).items()}
        got = tf.function(render_tf)(tf.constant(imgs), t, tf.constant(p.mirror), tf.constant(p.brightness),
                                     tf.constant(p.contrast), tf.constant(p.saturation), tf.constant(p.grey)).numpy()
        np.testing.assert_array_equal(got, want)
