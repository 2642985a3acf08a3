"""The benchmarks' own tests (run with the suite; tests/ never imports bench/): the pure arithmetic of
bench/projection.py, the idle guard's waiting rule and the synthetic emore pack writer
(bench/emore_listing.py), which must write the same bytes as the real RecordIO writer."""

from __future__ import annotations

import numpy as np
import pytest

from bench.common import wait_for_idle
from bench.emore_listing import TINY_IMAGE, class_sizes, image_records, write_list, write_pack
from bench.projection import (
    Cluster,
    Costs,
    interpolate,
    median,
    project_student_epoch,
    project_teacher_pass,
    rewritten,
    steady_cpu_per_row,
    steady_rate,
)
from distill.embed.recordio import InsightfacePack, write_insightface_rec

COSTS = Costs(decode_cpu_s=4e-4, preprocess_cpu_s=1e-4, train_decode_cpu_s=3e-4, encode_cpu_s_per_row=2e-5, shard_write_s=0.05,
              shard_bytes_per_row=10_000, ledger_ops_per_s=5_000)
FREE = dict(cpus_per_gpu=1e9, decode_threads=10**9, storage_gb_s=1e9)  # nothing but the GPU limits


def test_steady_rate_leaves_out_the_first_event_and_what_came_before():
    # 100 rows at t=10 (after 10 s of start-up), then 100 rows every second.
    events = [(10.0, 100), (11.0, 100), (12.0, 100), (13.0, 100)]
    assert steady_rate(events) == pytest.approx(100.0)
    assert steady_rate(list(reversed(events))) == pytest.approx(100.0)
    assert steady_rate(events, skip=2) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="at least 2"):
        steady_rate(events, skip=3)
    with pytest.raises(ValueError, match="no time"):
        steady_rate([(1.0, 5), (1.0, 5)])


def test_steady_cpu_per_row_uses_the_same_window():
    events = [(10.0, 100), (12.0, 100), (14.0, 100)]
    cpu = [(0.0, 0.0), (10.0, 5.0), (14.0, 13.0), (20.0, 14.0)]  # 2 cores busy from t=10 to t=14
    assert steady_cpu_per_row(events, cpu) == pytest.approx(8.0 / 200)


def test_interpolate_clamps_and_is_linear():
    s = [(1.0, 10.0), (3.0, 30.0)]
    assert interpolate(s, 0.0) == 10.0
    assert interpolate(s, 2.0) == pytest.approx(20.0)
    assert interpolate(s, 9.0) == 30.0


def test_median():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    with pytest.raises(ValueError):
        median([])


def test_rewritten_names_files_whose_inode_or_mtime_changed():
    before = {"part-00000.parquet": (1, 100), "part-00001.parquet": (2, 100), "part-00002.parquet": (3, 100)}
    after = {"part-00000.parquet": (1, 100), "part-00001.parquet": (9, 200), "part-00003.parquet": (4, 300)}
    assert rewritten(before, after) == ["part-00001.parquet"]


def test_teacher_pass_on_paper_matches_design_md():
    # DESIGN.md: one H100 at 40% of 990 TFLOP/s does ~16k IResNet-100 images/s; emore in ~6 min.
    free = Costs(**{**COSTS.__dict__, "encode_cpu_s_per_row": 0.0, "shard_write_s": 0.0})
    p = project_teacher_pass(free, Cluster(gpus=1, **FREE), flip=False)
    assert p.bound == "GPU compute"
    assert 5_822_653 / p.gpu_s == pytest.approx(16_364, rel=0.01)
    assert p.wall_s == pytest.approx(p.gpu_s)
    assert p.gpu_s / 60 == pytest.approx(5.9, abs=0.1)
    # Flip doubles the teacher's work, not the decode.
    pf = project_teacher_pass(free, Cluster(gpus=1, **FREE), flip=True)
    assert pf.gpu_s == pytest.approx(2 * p.gpu_s)
    assert pf.decode_s == pytest.approx(p.decode_s)


def test_teacher_pass_is_its_slowest_stream_since_they_all_overlap():
    p = project_teacher_pass(COSTS, Cluster(gpus=1, **FREE))
    shards = -(-5_822_653 // 1024)
    assert p.write_s == pytest.approx(shards * (1024 * 2e-5 + 0.05))
    assert p.wall_s == pytest.approx(max(p.gpu_s, p.write_s))
    slow_write = Costs(**{**COSTS.__dict__, "shard_write_s": 5.0})
    assert project_teacher_pass(slow_write, Cluster(gpus=1, **FREE)).bound == "shard encode + write"


def test_teacher_pass_scales_and_names_its_bound():
    one = project_teacher_pass(COSTS, Cluster(gpus=1))
    hundred = project_teacher_pass(COSTS, Cluster(gpus=100))
    assert hundred.gpu_s == pytest.approx(one.gpu_s / 100)
    assert hundred.decode_s == pytest.approx(one.decode_s / 100)
    assert hundred.write_s == pytest.approx(one.write_s / 100)
    assert hundred.ledger_s == pytest.approx(one.ledger_s)  # one shared ledger
    assert hundred.storage_s == pytest.approx(one.storage_s)  # one shared store
    # Decode runs on the actor's threads, not on every core of the node.
    few = project_teacher_pass(COSTS, Cluster(gpus=8, cpus_per_gpu=32, decode_threads=1))
    assert few.bound == "CPU decode"
    assert few.decode_s == pytest.approx(5_822_653 / 8 * (4e-4 + 1e-4))  # decode threads preprocess too
    # A slow ledger is the bound at scale.
    slow = Costs(**{**COSTS.__dict__, "ledger_ops_per_s": 5.0})
    assert project_teacher_pass(slow, Cluster(gpus=100)).bound == "ledger"
    with pytest.raises(ValueError):
        project_teacher_pass(COSTS, Cluster(gpus=0))


def test_student_epoch_is_three_forwards_per_image():
    p = project_student_epoch(COSTS, Cluster(gpus=1, **FREE), student_gflops=0.5)
    assert p.gpu_s == pytest.approx(5_822_653 * 1.5e9 / (990e12 * 0.4))
    assert p.ledger_s == 0.0 and p.write_s == 0.0
    assert project_student_epoch(COSTS, Cluster(gpus=100, cpus_per_gpu=2), 0.5).bound == "CPU input"


def test_class_sizes_cover_every_row():
    s = class_sizes(5_822_653, 85_742)
    assert s.sum() == 5_822_653 and len(s) == 85_742 and s.max() - s.min() <= 1
    with pytest.raises(ValueError):
        class_sizes(3, 5)


def test_image_records_are_byte_identical_to_the_recordio_writer(tmp_path):
    sizes = class_sizes(23, 4)
    write_pack(tmp_path / "fast", sizes)
    write_insightface_rec(str(tmp_path / "slow"), [[TINY_IMAGE] * int(n) for n in sizes])
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "slow" / name).read_bytes(), name


def test_fast_pack_lists_like_insightface(tmp_path):
    sizes = class_sizes(1000, 7)
    rec = write_pack(tmp_path, sizes)
    with InsightfacePack(str(rec), str(tmp_path / "train.idx")) as pack:
        labels = np.concatenate([lab for lab, _ in pack.chunks()])
    assert pack.num_classes == 7
    assert labels.tolist() == np.repeat(np.arange(7), sizes).tolist()


def test_image_records_refuse_a_magic_word():
    with pytest.raises(ValueError, match="magic"):
        image_records(1, np.zeros(1, np.float32), b"\x0a\x23\xd7\xce")


def test_write_list_lines(tmp_path):
    path = write_list(tmp_path / "l.txt", class_sizes(5, 2))
    assert path.read_text().splitlines() == [
        "/data/emore/00000/00000000.jpg\t0", "/data/emore/00000/00000001.jpg\t0", "/data/emore/00000/00000002.jpg\t0",
        "/data/emore/00001/00000003.jpg\t1", "/data/emore/00001/00000004.jpg\t1",
    ]


class Clock:
    """Time that moves only when the guard samples (each sample takes its window)."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def sampler(clock: Clock, busy: list[float]):
    def sample(window: float) -> float:
        clock.t += window
        return busy.pop(0)
    return sample


def test_idle_guard_waits_for_the_other_work_to_end():
    clock = Clock()
    idle = wait_for_idle(15.0, 60.0, 3.0, sample=sampler(clock, [90.0, 40.0, 10.0, 99.0]), clock=clock)
    assert (idle.busy, idle.busy_pct, clock.t) == (False, 10.0, 9.0)
    assert "10% CPU busy" in idle.label() and "BUSY" not in idle.label()


def test_idle_guard_gives_up_and_says_busy_when_the_wait_runs_out():
    clock = Clock()
    idle = wait_for_idle(15.0, 10.0, 3.0, sample=sampler(clock, [80.0] * 10), clock=clock)
    assert idle.busy and idle.busy_pct == 80.0
    assert clock.t == 12.0  # samples at 3, 6, 9 are inside the wait; the one ending at 12 is the last
    assert idle.label().endswith("(BUSY: not a result)")
