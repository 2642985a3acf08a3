import pytest

from distill.shards.plan import batches, num_shards, parse_shard_name, plan_shards, shard_at, shard_name


@pytest.mark.parametrize("total", [0, 1, 2, 63, 64, 65, 1000, 65_537])
@pytest.mark.parametrize("size", [1, 7, 64, 1024, 4096])
def test_plan_covers_every_row_once_in_order(total, size):
    shards = plan_shards(total, size)
    assert len(shards) == num_shards(total, size)
    covered = [r for s in shards for r in range(s.start, s.stop)]
    assert covered == list(range(total))
    assert all(0 < s.rows <= size for s in shards)
    assert [s.k for s in shards] == list(range(len(shards)))


def test_emore_scale_plan_is_a_formula():
    total, size = 5_822_653, 1024
    assert num_shards(total, size) == 5687
    last = shard_at(5686, total, size)
    assert (last.start, last.stop, last.rows) == (5686 * 1024, total, total - 5686 * 1024)


def test_names_come_from_the_plan_and_parse_back():
    assert shard_name(42) == "part-00042.parquet"
    assert shard_name(123456) == "part-123456.parquet"
    for k in (0, 7, 99999, 100000):
        assert parse_shard_name(shard_name(k)) == k
    for other in ("manifest.json", ".part-00001.parquet.tmp-1-ab", "part-1.parquet", "part-00001.parquet.bak"):
        assert parse_shard_name(other) is None


@pytest.mark.parametrize("bs", [1, 3, 32, 64, 100])
def test_batches_tile_the_shard(bs):
    s = shard_at(2, 150, 64)
    spans = batches(s, bs)
    assert spans[0][0] == s.start and spans[-1][1] == s.stop
    assert all(b - a == bs for a, b in spans[:-1]) and 0 < spans[-1][1] - spans[-1][0] <= bs
    assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))


@pytest.mark.parametrize("bad", [(10, 0), (10, -1), (-1, 5)])
def test_bad_plans_are_refused(bad):
    with pytest.raises(ValueError):
        plan_shards(*bad)
    with pytest.raises(ValueError, match="outside the plan"):
        shard_at(3, 10, 5)
