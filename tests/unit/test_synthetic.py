"""The synthetic identity dataset: deterministic, well-formed (the synthetic teacher trained on it:
tests/integration/test_synthetic_teacher.py)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from distill.synthetic import DATASET_MARKER, identity_template, make_identity_dataset, render_image


def _digest_tree(root):
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            h.update(os.path.relpath(p, root).encode() + b"\0")
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_dataset_is_deterministic_for_a_seed_and_differs_for_another(tmp_path):
    a = make_identity_dataset(str(tmp_path / "a"), identities=3, per_identity=2, size=48, seed=7)
    make_identity_dataset(str(tmp_path / "b"), identities=3, per_identity=2, size=48, seed=7)
    make_identity_dataset(str(tmp_path / "c"), identities=3, per_identity=2, size=48, seed=8)
    assert a.identities == 3 and a.seed == 7
    assert _digest_tree(tmp_path / "a") == _digest_tree(tmp_path / "b")
    assert _digest_tree(tmp_path / "a") != _digest_tree(tmp_path / "c")


def test_dataset_layout_and_format(tmp_path):
    out = tmp_path / "faces"
    make_identity_dataset(str(out), identities=4, per_identity=3, size=64, seed=0, first=10)
    folders = sorted(d for d in os.listdir(out) if (out / d).is_dir())
    assert folders == ["id00010", "id00011", "id00012", "id00013"]
    for d in folders:
        files = sorted(os.listdir(out / d))
        assert files == ["0000.jpg", "0001.jpg", "0002.jpg"]
        with Image.open(out / d / files[0]) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (64, 64)
    marker = json.loads((out / DATASET_MARKER).read_text())
    assert marker["identities"] == 4 and marker["first"] == 10 and marker["size"] == 64


def test_rerun_reuses_and_other_arguments_are_refused(tmp_path):
    out = str(tmp_path / "faces")
    make_identity_dataset(out, identities=2, per_identity=2, size=32)
    before = os.stat(os.path.join(out, "id00000", "0000.jpg")).st_mtime_ns
    make_identity_dataset(out, identities=2, per_identity=2, size=32)
    assert os.stat(os.path.join(out, "id00000", "0000.jpg")).st_mtime_ns == before
    with pytest.raises(ValueError, match="already holds a synthetic dataset"):
        make_identity_dataset(out, identities=3, per_identity=2, size=32)


def test_identity_is_a_template_and_images_vary_around_it():
    # The same identity number is the same face whatever set it is drawn in.
    assert np.array_equal(identity_template(0, 5)[1], identity_template(0, 5)[1])
    assert not np.array_equal(identity_template(0, 5)[1]["cx"], identity_template(0, 6)[1]["cx"])
    imgs = [render_image(0, 5, k, 64).astype(np.float32) for k in range(6)]
    others = [render_image(0, 6, k, 64).astype(np.float32) for k in range(6)]
    assert all(im.shape == (64, 64, 3) for im in imgs)
    assert not np.array_equal(imgs[0], imgs[1])  # pose, light, noise differ per image
    # Central face region (backgrounds are random per image): closer within an identity.
    c = slice(16, 48)

    def dist(a, b):
        return float(np.mean(np.abs(a[c, c] - b[c, c])))

    within = np.mean([dist(imgs[i], imgs[j]) for i in range(6) for j in range(i + 1, 6)])
    between = np.mean([dist(a, b) for a in imgs for b in others])
    assert within < between
