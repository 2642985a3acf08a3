"""The student's input stream: epoch order, resume cursor, bounded reading, flip targets."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
from toy_shards import write_toy_shards

from distill.shards.reader import open_shards, shard_set
from distill.train.order import (
    DEFAULT_PARTITIONS,
    buffer_shuffle,
    check_partitions,
    choose_target,
    epoch_order,
    flip_mask,
    kept_rows,
    partition_buffer,
    plan_epoch,
    steps_per_epoch,
)
from distill.train.stream import ReadStats, iter_samples, resolve_flip

ROW_SETS = ([5], [3, 7, 2], [256, 256, 256, 10], [1] * 9, [40, 0, 40], [600, 257])


@pytest.mark.parametrize("rows", ROW_SETS)
def test_every_row_once_per_epoch(rows):
    total = sum(rows)
    for parts, buffer, epoch in itertools.product((1, 2, 6, 24), (1, 2, 7, 4096), (0, 3)):
        got = epoch_order(rows, 11, epoch, parts, buffer)
        assert np.array_equal(np.sort(got), np.arange(total)), (parts, buffer, epoch)


def test_a_worker_computes_only_its_partitions_and_they_are_the_full_order_there():
    rows = [256, 256, 256, 10]
    full = epoch_order(rows, 4, 1, 6, 64)
    for world in (1, 2, 3, 6):
        for r in range(world):
            mine = epoch_order(rows, 4, 1, 6, 64, only=(r, world))
            assert np.array_equal(mine[r::world], full[r::world])
            assert (np.delete(mine, np.arange(r, len(mine), world)) == -1).all()


@pytest.mark.parametrize("rows", ROW_SETS)
def test_global_batches_are_the_same_whatever_the_worker_count(rows):
    """The point of canonical partitions: worker r of W takes positions r::W of each global
    batch, so the set of samples in global batch s never depends on W."""
    for batch, parts in ((12, 12), (24, 24), (6, 6)):
        steps = steps_per_epoch(sum(rows), batch)
        reference = epoch_order(rows, 5, 1, parts, 8)[: steps * batch].reshape(steps, batch)
        for world in (d for d in (1, 2, 3, 6, 12) if parts % d == 0 and batch % d == 0):
            plans = [plan_epoch(rows, seed=5, epoch=1, world_size=world, rank=r, buffer=8, global_batch=batch,
                                partitions=parts) for r in range(world)]
            assert all(p.steps == steps and p.remaining == steps * batch // world for p in plans)
            per_step = np.concatenate([p.order.reshape(steps, batch // world) for p in plans], axis=1)
            assert np.array_equal(np.sort(per_step, axis=1), np.sort(reference, axis=1)), (batch, world)


def test_a_worker_reads_only_the_shards_of_its_partitions():
    rows = [100] * 12
    plans = [plan_epoch(rows, seed=0, epoch=0, world_size=4, rank=r, buffer=64, global_batch=8, partitions=4)
             for r in range(4)]
    # 4 partitions of 300 rows (3 shards each): each worker reads its 3 shards and no other.
    assert [len(p.shards) for p in plans] == [3, 3, 3, 3]
    assert sorted(k for p in plans for k in p.shards) == list(range(12))


def test_order_is_a_pure_function_of_seed_and_epoch():
    rows = [64, 64, 64, 30]
    a = epoch_order(rows, 7, 2, 4, 32)
    assert np.array_equal(a, epoch_order(rows, 7, 2, 4, 32))
    assert not np.array_equal(a, epoch_order(rows, 8, 2, 4, 32))
    assert not np.array_equal(a, epoch_order(rows, 7, 3, 4, 32))


def test_buffer_bounds_how_far_ahead_the_order_reaches():
    rng = np.random.default_rng(0)
    for n, buffer in ((1000, 16), (50, 64), (300, 1)):
        order = buffer_shuffle(n, buffer, rng)
        assert np.array_equal(np.sort(order), np.arange(n))
        # Emission i only ever needs stream items read so far: fewer than buffer + i + 1.
        assert np.all(np.maximum.accumulate(order) < np.arange(n) + max(buffer, 1))
    assert partition_buffer(4096, 24) == 170 and partition_buffer(8, 24) == 1


@pytest.mark.parametrize("saved_world,world", [(1, 1), (1, 2), (2, 1), (2, 3), (3, 6), (6, 2)])
def test_a_cursor_resumes_with_any_worker_count_at_exactly_the_next_sample(saved_world, world):
    rows, batch, parts = [50, 31, 77, 12], 12, 6
    kw = dict(seed=3, epoch=4, buffer=20, global_batch=batch, partitions=parts)
    full = [plan_epoch(rows, world_size=saved_world, rank=r, **kw) for r in range(saved_world)]
    steps = full[0].steps
    for step in range(steps + 1):
        # Trained before the cursor, by saved_world workers; the rest, by world workers.
        before = np.concatenate([p.order[: step * batch // saved_world] for p in full])
        rest = [plan_epoch(rows, world_size=world, rank=r, samples=step * batch, **kw) for r in range(world)]
        assert all(p.start_step == step for p in rest)
        after = np.concatenate([p.order for p in rest])
        seen = np.concatenate([before, after])
        assert len(seen) == len(np.unique(seen)) == steps * batch  # nothing twice, nothing skipped
        assert np.array_equal(np.sort(seen), np.sort(np.concatenate([p.order for p in full])))


def test_cursor_off_the_batch_grid_or_a_worker_count_off_the_partitions_is_refused():
    with pytest.raises(ValueError, match="does not fall on a batch"):
        plan_epoch([40], seed=0, epoch=0, world_size=1, rank=0, buffer=4, global_batch=8, samples=12)
    with pytest.raises(ValueError, match="multiple of the worker count"):
        plan_epoch([40], seed=0, epoch=0, world_size=3, rank=0, buffer=4, global_batch=8)
    with pytest.raises(ValueError, match="5 workers do not divide --partitions 24: .* any of 1, 2, 3, 4, 6, 8, 12, 24 "
                                         "workers.*e.g. 120"):
        plan_epoch([40], seed=0, epoch=0, world_size=5, rank=0, buffer=4, global_batch=10, partitions=24)
    check_partitions(DEFAULT_PARTITIONS, 8)
    with pytest.raises(ValueError, match="--partitions must be >= 1"):
        check_partitions(0, 1)


def test_reader_yields_the_plan_in_order_and_holds_the_buffer_and_a_row_group_per_partition(tmp_path):
    shards = open_shards(str(write_toy_shards(tmp_path / "s", rows=700, shard_size=300, size=32)))
    for parts in (1, 4):
        plan = plan_epoch(shards.rows, seed=1, epoch=0, world_size=1, rank=0, buffer=64, global_batch=10,
                          partitions=parts)
        stats = ReadStats()
        chunks = list(iter_samples(shards, plan, seed=1, flip=True, chunk=50, stats=stats))
        index = np.concatenate([c["index"] for c in chunks])
        assert np.array_equal(index, plan.order)  # toy listing index == sample id
        # The buffer, plus at most one row group per partition in use (and one more where a
        # partition ends inside a row group that the next one starts).
        assert stats.peak_held <= 64 + (2 * parts) * 256, (parts, stats.peak_held)
        assert stats.row_groups_read == 5  # 256 + 44 rows in each of 2 shards, then 100: each read once
    assert all(len(c["image"]) <= 50 for c in chunks)


def test_resume_skips_row_groups_it_no_longer_needs(tmp_path):
    shards = open_shards(str(write_toy_shards(tmp_path / "s", rows=700, shard_size=300, size=32)))
    kw = dict(seed=2, epoch=1, world_size=1, rank=0, buffer=16, global_batch=10, partitions=1)
    full = plan_epoch(shards.rows, **kw)
    late = plan_epoch(shards.rows, **kw, samples=600)
    stats = ReadStats()
    index = np.concatenate([c["index"] for c in iter_samples(shards, late, seed=2, flip=False, stats=stats)])
    assert np.array_equal(index, full.order[600:])
    # 5 row groups in 3 shards (256+44, 256+44, 100): the last 100 samples need only a few.
    assert stats.shards_skipped + stats.row_groups_skipped > 0 and stats.row_groups_read < 5


def test_flip_target_is_embedding_flip_iff_flipped(tmp_path):
    shards = open_shards(str(write_toy_shards(tmp_path / "s", rows=64, shard_size=32)))
    plan = plan_epoch(shards.rows, seed=4, epoch=0, world_size=1, rank=0, buffer=8, global_batch=8)
    (c,) = list(iter_samples(shards, plan, seed=4, flip=True, chunk=64))
    plain = list(iter_samples(shards, plan, seed=4, flip=False, chunk=64))[0]
    assert 0 < c["flipped"].sum() < len(c["flipped"])
    assert np.array_equal(c["flipped"], flip_mask(4, 0, c["index"]))
    assert not plain["flipped"].any()
    from toy_shards import toy_images, toy_teacher

    imgs, _ = toy_images(64, 4, 32)
    emb, emb_flip = toy_teacher(imgs, 8), toy_teacher(imgs[:, :, ::-1], 8)
    want = np.where(c["flipped"][:, None], emb_flip[c["index"]], emb[c["index"]])
    np.testing.assert_array_equal(c["target"], want)
    np.testing.assert_array_equal(plain["target"], emb[plain["index"]])


def test_choose_target_and_flip_mask_are_pure():
    e, f = np.zeros((3, 2), np.float32), np.ones((3, 2), np.float32)
    assert choose_target(e, f, np.array([True, False, True]))[:, 0].tolist() == [1, 0, 1]
    idx = np.arange(10_000)
    m = flip_mask(0, 0, idx)
    assert np.array_equal(m, flip_mask(0, 0, idx)) and 0.45 < m.mean() < 0.55
    assert (m != flip_mask(0, 1, idx)).mean() > 0.4 and (m != flip_mask(1, 0, idx)).mean() > 0.4


def test_shards_without_flip_disable_it_with_a_warning(tmp_path, caplog):
    shards = open_shards(str(write_toy_shards(tmp_path / "s", rows=32, flip=False)))
    with caplog.at_level(logging.WARNING):
        assert resolve_flip(shards, True) is False
    assert "embedding_flip" in caplog.text
    assert resolve_flip(shards, False) is False


def test_unusable_shard_dirs_are_refused_with_the_fix(tmp_path):
    from distill.shards.manifest import load_manifest

    loc = str(write_toy_shards(tmp_path / "a", rows=96, shard_size=32, drop_shards=2))
    with pytest.raises(ValueError, match=r"2 of 3 shards are missing.*distill embed"):
        shard_set(loc, load_manifest(loc))
    loc = str(write_toy_shards(tmp_path / "b", rows=32, images=False))
    with pytest.raises(ValueError, match="no images"):
        open_shards(loc)
    with pytest.raises(FileNotFoundError, match="distill embed"):
        open_shards(str(tmp_path / "nothing"))


def test_excluded_rows_never_train_and_the_rest_train_once():
    rows = [40, 33, 27]
    exclude = np.zeros(100, bool)
    exclude[[0, 5, 41, 42, 99]] = True
    exclude[60:70] = True
    for world in (1, 2):
        plans = [plan_epoch(rows, seed=2, epoch=1, world_size=world, rank=r, buffer=16, global_batch=4 * world,
                            exclude=exclude) for r in range(world)]
        got = np.concatenate([p.order for p in plans])
        assert not exclude[got].any() and len(np.unique(got)) == len(got)
        kept = np.asarray(kept_rows(rows, exclude))
        assert kept.tolist() == [38, 21, 26]  # 0,5 | 41,42,60..69 | 99
        if world == 1:  # one rank drops only the remainder of a batch
            assert len(got) == (exclude.size - exclude.sum()) // 4 * 4
        # Resuming mid-epoch yields exactly the rest of the same order.
        full = plans[0]
        later = plan_epoch(rows, seed=2, epoch=1, world_size=world, rank=0, buffer=16, global_batch=4 * world,
                           samples=3 * 4 * world, exclude=exclude)
        assert np.array_equal(later.order, full.order[3 * 4:])
