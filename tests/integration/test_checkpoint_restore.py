"""Checkpoints restore variables by name: a changed graph fails loudly, never loads the wrong
tensor of the same shape."""

from __future__ import annotations

import os

import numpy as np
import pytest

from distill.errors import IncompatibleRun
from distill.train.checkpoints import Cursor, LocalCheckpoints, average_key, load_student, restore, snapshot

pytestmark = pytest.mark.integration


def _mlp(names: list[str]):
    """Dense layers of one shape (4 -> 4) in the given order: positions say nothing about names."""
    import keras

    x = inp = keras.Input((4,))
    for n in names:
        x = keras.layers.Dense(4, name=n)(x)
    return keras.Model(inp, x)


def _save(tmp_path, model, optimizer) -> str:
    cursor = Cursor(0, 0, 1, 0, 1, 8, 64, "r")
    return LocalCheckpoints(str(tmp_path), keep=1).save(snapshot(model, optimizer), {}, cursor, {})


def test_reordered_layers_get_their_own_tensors_and_renamed_ones_fail(tmp_path):
    import keras

    a = _mlp(["first", "second"])
    for i, v in enumerate(a.weights):  # every tensor distinct
        v.assign(np.full(v.shape, float(i + 1), np.float32))
    opt = keras.optimizers.Adam()
    opt.build(a.trainable_variables)
    path = _save(tmp_path, a, opt)

    b = _mlp(["second", "first"])  # same shapes at every position, in the other order
    opt_b = keras.optimizers.Adam()
    opt_b.build(b.trainable_variables)
    restore(b, opt_b, path)
    for layer in ("first", "second"):
        for va, vb in zip(a.get_layer(layer).weights, b.get_layer(layer).weights):
            np.testing.assert_array_equal(vb.numpy(), va.numpy())
    assert not np.array_equal(b.get_layer("first").kernel.numpy(), b.get_layer("second").kernel.numpy())

    c = _mlp(["first", "third"])  # one layer renamed: same variable count and shapes
    with pytest.raises(IncompatibleRun, match=r"missing from it \(e.g. third/bias, third/kernel\).*second/bias"):
        load_student(c, path)


def test_a_changed_shape_and_an_old_positional_checkpoint_are_refused(tmp_path):
    a = _mlp(["first"])
    path = _save(tmp_path, a, None)
    import keras

    x = inp = keras.Input((4,))
    wider = keras.Model(inp, keras.layers.Dense(5, name="first")(x))
    with pytest.raises(IncompatibleRun, match=r"first/kernel is \(4, 5\), the checkpoint has \(4, 4\)"):
        load_student(wider, path)
    old = tmp_path / "old"
    old.mkdir()
    np.savez(old / "state.npz", **{"model.00000": np.zeros((4, 4)), "model.00001": np.zeros(4)})
    with pytest.raises(IncompatibleRun, match="older distill .* by position"):
        load_student(a, str(old))
    assert os.path.isdir(path)


def test_the_best_checkpoint_holds_the_model_by_name_without_the_optimizer(tmp_path):
    import keras

    from distill.train.checkpoints import write_best

    a = _mlp(["first", "second"])
    opt = keras.optimizers.Adam()
    opt.build(a.trainable_variables)
    best = write_best(str(tmp_path), snapshot(a, opt), {}, Cursor(1, 0, 5, 0, 1, 8, 64, "r"), {"val_auc": 0.9})
    with np.load(os.path.join(best, "state.npz")) as z:
        assert z.files and all(k.startswith("model/") for k in z.files)
    b = _mlp(["second", "first"])
    load_student(b, best)
    np.testing.assert_array_equal(b.get_layer("first").kernel.numpy(), a.get_layer("first").kernel.numpy())


def test_ema_averages_ride_with_the_optimizer_and_are_what_the_student_is_judged_by(tmp_path):
    """--ema: Keras keeps each trainable variable's moving average as an optimizer variable. A
    snapshot holds one for every trainable variable under ``average_key``; resuming restores the
    last weights and the averages, loading the student for validation or export takes the averages."""
    import keras

    a = _mlp(["first", "second"])
    opt = keras.optimizers.Adam(0.1, use_ema=True, ema_momentum=0.5)
    opt.build(a.trainable_variables)
    for _ in range(3):
        opt.apply_gradients([(np.ones(v.shape, np.float32), v) for v in a.trainable_variables])
    state = snapshot(a, opt)
    assert all(average_key(v.path) in state for v in a.trainable_variables)
    last, avg = a.get_layer("first").kernel.numpy(), state[average_key(a.get_layer("first").kernel.path)]
    assert not np.allclose(last, avg)  # three steps of 0.1 against their average at momentum 0.5
    path = _save(tmp_path, a, opt)

    b = _mlp(["first", "second"])
    opt_b = keras.optimizers.Adam(0.1, use_ema=True, ema_momentum=0.5)
    opt_b.build(b.trainable_variables)
    restore(b, opt_b, path)
    np.testing.assert_array_equal(b.get_layer("first").kernel.numpy(), last)
    np.testing.assert_array_equal(opt_b.variables[2].numpy(), opt.variables[2].numpy())
    c = _mlp(["first", "second"])
    load_student(c, path)
    np.testing.assert_array_equal(c.get_layer("first").kernel.numpy(), avg)
    d = _mlp(["first", "third"])  # averages for some trainable variables only: another architecture
    with pytest.raises(IncompatibleRun, match="moving averages .* for 2 of the student's 4"):
        load_student(d, path)
