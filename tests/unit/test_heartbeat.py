"""The heartbeat's decisions (when a line is due, the pace, the ETA, the words) with time passed
in: no clock, no TensorFlow, no Ray."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from distill.errors import BadOption
from distill.heartbeat import Heartbeat, check_every, duration, eta, interval, shards_line, train_line


def test_a_line_is_due_every_interval_from_the_last_one_and_never_when_off():
    h = Heartbeat(every=30.0, last_time=100.0)
    assert not h.due(100.0) and not h.due(129.9) and h.due(130.0)
    h.beat(131.0, 0)
    assert not h.due(160.9) and h.due(161.0)  # (from the line, not from the schedule: a slow step does not pile up)
    off = Heartbeat(every=0.0, last_time=0.0)
    assert not any(off.due(t) for t in (0.0, 1.0, 1e9))
    assert Heartbeat(every=0.25, last_time=0.0).due(0.25)  # (a float: tests use a fraction of a second)


@pytest.mark.parametrize("seed", range(20))
def test_the_pace_is_the_work_done_over_the_last_window_of_lines(seed):
    import random

    rnd = random.Random(seed)
    window = rnd.randint(1, 6)
    marks = [(rnd.uniform(0, 1e6), rnd.randrange(10**6))]
    h = Heartbeat(every=rnd.uniform(0.1, 60), last_time=marks[0][0], last_done=marks[0][1], window=window)
    for _ in range(12):
        t, done = marks[-1][0] + rnd.uniform(0.1, 100), marks[-1][1] + rnd.randrange(10**5)
        marks.append((t, done))
        then, done_then = marks[-1 - window] if len(marks) > window else marks[0]
        assert math.isclose(h.beat(t, done), (done - done_then) / (t - then))
        assert (h.last_time, h.last_done) == (t, done)


def test_a_line_between_two_finished_shards_keeps_the_recent_pace():
    h = Heartbeat(every=30.0, last_time=0.0)  # (the default window: 5 lines)
    assert h.beat(30.0, 3000) == 100.0
    assert h.beat(60.0, 3000) == 50.0  # (no shard finished in these 30 s: the pace is not 0)
    for t in (90.0, 120.0, 150.0, 180.0):
        h.beat(t, 3000)
    assert h.beat(210.0, 3000) == 0.0  # (stalled for the whole window: now it is)


def test_work_taken_back_gives_no_negative_rate_and_no_time_no_division_error():
    h = Heartbeat(every=1.0, last_time=0.0, last_done=500, window=1)
    assert h.beat(10.0, 300) == 0.0  # a failed attempt's rows forgotten
    assert h.beat(10.0, 300) == 0.0  # (the same instant)


def test_the_interval_is_zero_where_bars_show_progress_or_on_other_ranks():
    assert interval(30.0, bars=False) == 30.0
    assert interval(30.0, bars=True) == 0.0
    assert interval(30.0, bars=False, rank=1) == 0.0 and interval(0.5, bars=False, rank=0) == 0.5
    assert interval(0, bars=False) == 0.0


@pytest.mark.parametrize("bad", [-1, -0.001, float("nan")])
def test_a_negative_interval_is_refused_naming_the_option(bad):
    with pytest.raises(BadOption, match="--heartbeat"):
        check_every(bad)
    with pytest.raises(BadOption, match="--heartbeat"):
        Heartbeat(every=bad, last_time=0.0)


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (0.4, "0s"), (42, "42s"), (59.6, "1m00s"), (185, "3m05s"),
                                          (3599, "59m59s"), (3600, "1h00m"), (7620, "2h07m"), (86399, "23h59m"),
                                          (86400, "1d00h"), (273600, "3d04h")])
def test_durations_read_as_a_log_says_them(seconds, text):
    assert duration(seconds) == text


def test_eta_is_what_is_left_at_the_pace():
    assert eta(3000, 100.0) == "30s"
    assert eta(0, 0.0) == "0s" and eta(-5, 10.0) == "0s"  # (done: nothing left, whatever the pace)
    assert eta(10, 0.0) == "unknown"  # (no progress in the last interval: no guess)


TRAIN = dict(step=1200, total_steps=45000, epoch=2, epochs=20, samples=3200, batch_size=64, images_per_sec=312.4,
             parts={"loss": 0.41234, "distill": 0.41234, "cos": 0.79401}, lr=0.0039421)


def test_the_train_line_says_where_how_fast_how_well_and_how_long():
    line = train_line(**TRAIN)
    assert line == ("train: step 1,200/45,000 (2.7%), epoch 2/20 at sample 3,200, 312 img/s, loss 0.4123, "
                    "distill 0.4123, cos 0.7940, lr 0.00394, ETA 2h29m")  # (43,800 steps x 64 / 312.4 img/s: 8,973 s)
    assert "ETA 0s" in train_line(**{**TRAIN, "step": 45000})
    assert "ETA unknown" in train_line(**{**TRAIN, "images_per_sec": 0.0})
    # Every named loss part, as it is named; the cosine last.
    parts = {"loss": 1.5, "distill": 0.5, "contrast": 0.7, "ce": 0.3, "cos": 0.6}
    assert ", loss 1.5000, distill 0.5000, contrast 0.7000, ce 0.3000, cos 0.6000, lr" in train_line(**{**TRAIN, "parts": parts})


def test_the_shards_line_says_shards_rows_pace_eta_and_only_then_the_given_up():
    line = shards_line(verb="embed", shards_done=37, shards_total=5664, rows_done=37888, rows_total=5_800_000,
                       images_per_sec=412.0)
    assert line == "embed: 37/5,664 shards done, 37,888/5,800,000 rows (0.7%), 412 img/s, ETA 3h53m"
    failed = shards_line(verb="align", shards_done=3, shards_total=4, rows_done=900, rows_total=1000,
                         images_per_sec=0.0, failed=1, unit="photos")
    assert failed.startswith("align: 3/4 shards done, 900/1,000 photos (90.0%), 0 img/s, ETA unknown; 1 shard(s) "
                             "given up")


def test_a_changed_heartbeat_changes_no_recipe_so_a_resume_is_not_refused(tmp_path):
    """--heartbeat is a log setting, as --progress is: config.json records it, check_resume ignores it."""
    import json

    from toy_shards import write_toy_shards

    from distill.shards.reader import open_shards
    from distill.train.checkpoints import Cursor
    from distill.train.config import TrainConfig, TrainRun, check_resume, resolve

    shards = open_shards(str(write_toy_shards(tmp_path / "shards", rows=64, shard_size=32)))
    cfg = TrainConfig(shards=shards.location, out="o", batch_size=16)
    saved = json.loads(json.dumps(resolve(cfg, shards).with_schedule(64).to_json()))
    assert saved["train"]["heartbeat"] == 30.0
    cursor = Cursor(1, 32, 6, 0, 1, 16, cfg.shuffle_buffer, shards.run_id)
    for every in (0.0, 0.5, 600.0):
        check_resume(saved, cursor, resolve(replace(cfg, heartbeat=every), shards), "ckpt")
    del saved["train"]["heartbeat"]  # a run saved before the option: it takes the default
    assert TrainRun.from_json(saved).train.heartbeat == 30.0
