"""The student's input stream as TensorFlow reads it: the dataset decodes, mirrors and batches the
planned samples, and the decoder check compares TensorFlow's pixels with the teacher's."""

from __future__ import annotations

import numpy as np
import pytest
from toy_shards import write_toy_shards

from distill.shards.reader import open_shards
from distill.train.order import plan_epoch

pytestmark = pytest.mark.integration


def test_dataset_decodes_mirrors_and_scales(tmp_path):
    import tensorflow as tf
    from toy_shards import toy_images

    from distill.train.stream import make_dataset

    shards = open_shards(str(write_toy_shards(tmp_path / "s", rows=32, shard_size=16)))
    plan = plan_epoch(shards.rows, seed=9, epoch=0, world_size=1, rank=0, buffer=8, global_batch=8)
    imgs, _ = toy_images(32, 4, 32)
    batches = list(make_dataset(shards, plan, seed=9, flip=True, replica_batch=8))
    assert len(batches) == 4
    for b in batches:
        assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == tf.uint8  # the student scales its own
        for x, i, f in zip(b["image"].numpy(), b["index"].numpy(), b["flipped"].numpy()):
            want = imgs[i][:, ::-1] if f else imgs[i]
            np.testing.assert_array_equal(x, want)
    assert np.array_equal(np.concatenate([b["index"].numpy() for b in batches]), plan.order)


def test_the_decoder_check_passes_on_the_teachers_pixels_and_names_versions_when_they_differ(tmp_path, monkeypatch):
    import tensorflow  # noqa: F401

    import distill.images
    from distill.train.stream import check_decoder

    shards = open_shards(str(write_toy_shards(tmp_path / "s", rows=16, shard_size=8)))
    check_decoder(shards)  # the same pixels: nothing to say
    real = distill.images.decode_rgb
    # Another Pillow whose decode differed by one level somewhere (a library we cannot install here).
    monkeypatch.setattr(distill.images, "decode_rgb", lambda data: real(data) ^ np.uint8(1))
    with pytest.raises(ValueError, match=r"TensorFlow .* decodes the stored image of listing row 0 .* Pillow"):
        check_decoder(shards)
