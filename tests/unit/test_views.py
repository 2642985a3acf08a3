"""Teacher views: parameters as a pure function of (seed, index, view), exact rendering."""

from __future__ import annotations

import numpy as np
import pytest

from distill.views import ViewSpec, choose_views, plain_params, render, uniforms, view_params

SIZE = (112, 112)


def _faces(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:112, 0:112] / 112.0
    base = (np.stack([yy, xx, yy * xx], -1) * 255)[None]
    return np.clip(base + rng.normal(0, 20, (n, 112, 112, 3)), 0, 255).astype(np.uint8)


def test_params_are_a_pure_function_of_seed_index_and_view():
    spec = ViewSpec(count=4, seed=3)
    a = view_params(spec, np.arange(50), 1, SIZE)
    b = view_params(spec, np.arange(50), 1, SIZE)
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("box", "mirror", "brightness", "grey"))
    # Any row alone gives the same view as within a batch: no state, no order.
    one = view_params(spec, np.array([17]), 1, SIZE)
    assert np.array_equal(one.box[0], a.box[17]) and one.brightness[0] == a.brightness[17]
    other_view = view_params(spec, np.arange(50), 2, SIZE)
    other_seed = view_params(ViewSpec(count=4, seed=4), np.arange(50), 1, SIZE)
    assert not np.array_equal(a.box, other_view.box) and not np.array_equal(a.box, other_seed.box)
    assert len({tuple(r) for r in a.box.round(6)}) == 50  # different index -> different view


def test_params_stay_within_the_spec():
    spec = ViewSpec(count=8, scale=(0.7, 0.9), flip=0.5, grey=0.2, brightness=0.1)
    p = view_params(spec, np.arange(4000), 5, SIZE)
    y0, x0, h, w = p.box.T
    assert (y0 >= -1e-9).all() and (x0 >= -1e-9).all() and (y0 + h <= 112 + 1e-9).all() and (x0 + w <= 112 + 1e-9).all()
    side = np.sqrt(h * w) / 112
    assert side.min() > 0.7 * 0.9 and side.max() < 0.9 * 1.1  # side within the scale range, give or take aspect
    assert abs(p.mirror.mean() - 0.5) < 0.05 and abs(p.grey.mean() - 0.2) < 0.03
    assert np.abs(p.brightness).max() <= 0.1 * 255 + 1e-3


def test_uniforms_are_uniform_and_independent_across_draws():
    u = uniforms(0, 1, np.arange(20000), np.zeros(20000, np.int64), 3)
    assert u.min() >= 0 and u.max() < 1
    assert np.all(np.abs(u.mean(axis=0) - 0.5) < 0.01)
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03


def test_plain_view_is_the_image_exactly_and_mirror_is_exact():
    x = _faces(4)
    mirror = np.array([False, True, False, True])
    out = render(x, plain_params(mirror, SIZE))
    assert np.array_equal(out[0], x[0]) and np.array_equal(out[1], x[1][:, ::-1])


def test_rendering_does_not_depend_on_the_batch():
    x = np.repeat(_faces(1), 6, axis=0)
    p = view_params(ViewSpec(count=6, grey=0.5), np.zeros(6, np.int64), np.arange(6), SIZE)
    batch = render(x, p)
    single = np.stack([render(x[i:i + 1], p.take([i]))[0] for i in range(6)])
    assert np.array_equal(batch, single)
    assert render(x, p).dtype == np.uint8 and len({b.tobytes() for b in batch}) == 6


def test_a_view_is_a_crop_of_the_image():
    # A constant image stays constant under any crop, mirror and (no) colour change.
    x = np.full((3, 112, 112, 3), 77, np.uint8)
    spec = ViewSpec(count=3, brightness=0, contrast=0, saturation=0, grey=0)
    assert (render(x, view_params(spec, np.arange(3), 0, SIZE)) == 77).all()
    # Grey views have equal channels.
    grey = view_params(ViewSpec(count=1, grey=1.0), np.arange(3), 0, SIZE)
    out = render(_faces(3), grey)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_choose_views_is_pure_and_follows_view_prob():
    idx = np.arange(10000)
    a = choose_views(1, 2, idx, 4, 0.75)
    assert np.array_equal(a, choose_views(1, 2, idx, 4, 0.75))
    assert not np.array_equal(a, choose_views(1, 3, idx, 4, 0.75))  # another epoch, other views
    assert abs((a >= 0).mean() - 0.75) < 0.02 and set(np.unique(a)) == {-1, 0, 1, 2, 3}
    assert (choose_views(1, 2, idx, 0, 0.75) == -1).all() and (choose_views(1, 2, idx, 4, 0.0) == -1).all()


def test_spec_round_trips_and_refuses_nonsense():
    spec = ViewSpec(count=3, seed=2, scale=(0.6, 0.95))
    assert ViewSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="--view-scale"):
        ViewSpec(scale=(0.9, 0.5))
    with pytest.raises(ValueError, match="--views"):
        ViewSpec(count=-1)
    with pytest.raises(ValueError, match="probability"):
        ViewSpec(grey=1.5)
    with pytest.raises(ValueError, match="uint8"):
        render(np.zeros((1, 8, 8, 3), np.float32), plain_params(np.zeros(1, bool), (8, 8)))
