"""The trainer's pure decisions and its checkpoint files (no TensorFlow, no Ray)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace

import numpy as np
import pytest
from toy_shards import write_toy_shards

from distill.errors import IncompatibleRun
from distill.shards.reader import open_shards
from distill.train.checkpoints import Cursor, LocalCheckpoints, average_key, averaged, not_finite, read_checkpoint
from distill.train.config import (
    Schedule,
    TrainConfig,
    TrainRun,
    check_resume,
    default_resolution,
    ema_warning,
    lr_schedule,
    objective_changes,
    resolve,
    working_resolution,
)
from distill.train.loop import _trim_jsonl


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return open_shards(str(write_toy_shards(tmp_path_factory.mktemp("s") / "shards", rows=64, shard_size=32)))


def _cursor(**kw) -> Cursor:
    base = dict(epoch=1, samples=32, step=6, seed=0, world_size=1, global_batch=16, shuffle_buffer=64, shards_run_id="r")
    return Cursor(**{**base, **kw})


def _saved(cfg: TrainConfig, shards, train_rows: int = 64) -> dict:
    """The config as a checkpoint holds it: resolved, its schedule recorded, through JSON."""
    return json.loads(json.dumps(resolve(cfg, shards).with_schedule(train_rows).to_json()))


def test_resume_with_the_same_command_is_accepted_and_options_that_do_not_touch_the_order_may_change(shards):
    cfg = TrainConfig(shards=shards.location, out="o", batch_size=16)
    saved = _saved(cfg, shards)
    check_resume(saved, _cursor(shards_run_id=shards.run_id), resolve(cfg, shards), "ckpt")
    check_resume(saved, _cursor(), resolve(replace(cfg, distill_weight=3.0, checkpoint_every=7), shards), "ckpt")
    # --max-steps stops early and does not shape the schedule: a run can be trained in parts.
    for steps in (5, 50, 10_000):
        check_resume(saved, _cursor(), resolve(replace(cfg, max_steps=steps), shards), "ckpt")


def test_a_resume_that_changes_the_objective_is_allowed_and_named(shards):
    """A run saved with the contrastive term (the default until 2026-12-05), rerun with today's
    defaults: allowed (no order or graph depends on it), and each change is named."""
    old = TrainConfig(shards=shards.location, out="o", batch_size=16, contrast_weight=1.0)
    saved = _saved(old, shards)
    now = resolve(replace(old, contrast_weight=0.0), shards)
    check_resume(saved, _cursor(), now, "ckpt")
    assert objective_changes(saved, now) == ["--contrast-weight 1.0 -> 0.0"]
    assert objective_changes(saved, resolve(old, shards)) == []


@pytest.mark.parametrize("change", [dict(epochs=30), dict(epochs=3), dict(lr=0.1),
                                    dict(warmup_steps=0), dict(lr_schedule="constant")])
def test_a_resume_that_would_change_the_learning_rate_of_steps_taken_is_refused(shards, change):
    cfg = TrainConfig(shards=shards.location, out="o", batch_size=16)  # 20 epochs x 4 steps, cosine
    with pytest.raises(IncompatibleRun, match="learning-rate schedule: checkpoint follows cosine, lr 0.004, 79 warm-up") as e:
        check_resume(_saved(cfg, shards), _cursor(), resolve(replace(cfg, **change), shards), "ckpt")
    assert "--init OUT" in str(e.value)


def test_a_constant_schedule_may_be_extended_or_shortened(shards):
    cfg = TrainConfig(shards=shards.location, out="o", batch_size=16, lr_schedule="constant", warmup_steps=4)
    saved = _saved(cfg, shards)
    for change in (dict(epochs=40), dict(epochs=2), dict(max_steps=9)):
        check_resume(saved, _cursor(), resolve(replace(cfg, **change), shards), "ckpt")
    with pytest.raises(IncompatibleRun, match="these options make it constant, lr 0.01"):
        check_resume(saved, _cursor(), resolve(replace(cfg, lr=0.01), shards), "ckpt")


def test_incompatible_resume_names_every_difference(shards):
    cfg = TrainConfig(shards=shards.location, out="o", batch_size=16)
    saved = resolve(cfg, shards).to_json()
    other = resolve(replace(cfg, batch_size=32, seed=4, width=0.75), shards)
    with pytest.raises(ValueError) as e:
        check_resume(saved, _cursor(), other, "ckpt")
    msg = str(e.value)
    assert "--batch-size: checkpoint has 16, now 32" in msg and "--seed" in msg and "width" in msg
    assert "new --out" in msg
    saved_other_shards = {**saved, "shards_run_id": "elsewhere"}
    with pytest.raises(ValueError, match="shards: checkpoint trained on run elsewhere"):
        check_resume(saved_other_shards, _cursor(), resolve(cfg, shards), "ckpt")


def test_ema_is_fixed_for_a_run_and_its_averages_stand_in_for_the_trained_weights(shards):
    cfg = TrainConfig(shards=shards.location, out="o", batch_size=16)
    saved = resolve(cfg, shards).to_json()
    with pytest.raises(IncompatibleRun, match=r"--ema: checkpoint has 0.0, now 0.995"):  # (the optimizer's variables)
        check_resume(saved, _cursor(), resolve(replace(cfg, ema=0.995), shards), "ckpt")
    older = {**saved, "train": {k: v for k, v in saved["train"].items() if k != "ema"}}  # saved before --ema
    check_resume(older, _cursor(), resolve(cfg, shards), "ckpt")
    assert ema_warning(0.0, 100) is None and ema_warning(0.995, 1188) is None  # 0.26% of step 1 left: fine
    assert ema_warning(0.999, 1188) == ("--ema 0.999 over 1188 steps: the first step's weights still make up 30% of "
                                        "the average at the end; a decay of about 0.9958 averages the last ~240 steps")
    with pytest.raises(ValueError, match=r"--ema is a decay in \[0, 1\) \(e.g. 0.995; 0: off\), got 1.0"):
        TrainConfig(shards="s", out="o", ema=1.0)

    one, two, stats = np.ones(2), np.full(2, 2.0), np.full(2, 9.0)
    state = {"model/d/kernel": one, "model/bn/moving_mean": stats, "optimizer/d_kernel_momentum": one}
    assert average_key("d/kernel") == "optimizer/d_kernel_average"
    assert averaged(state, ["d/kernel"]) is state  # no averages kept: the weights as trained
    with_avg = {**state, average_key("d/kernel"): two}
    got = averaged(with_avg, ["d/kernel"])
    assert got["model/d/kernel"] is two and got["model/bn/moving_mean"] is stats and with_avg["model/d/kernel"] is one
    with pytest.raises(IncompatibleRun, match="moving averages .* for 1 of the student's 2 trainable"):
        averaged(with_avg, ["d/kernel", "e/kernel"], "ckpt")


def test_the_worker_count_may_change_anywhere_but_an_older_order_only_at_an_epoch_boundary(shards):
    cfg = TrainConfig(shards=shards.location, out="o", batch_size=16)
    saved = resolve(cfg, shards).to_json()
    check_resume(saved, _cursor(samples=0, world_size=2), resolve(cfg, shards), "ckpt")
    check_resume(saved, _cursor(samples=32, world_size=2), resolve(cfg, shards), "ckpt")  # canonical order
    with pytest.raises(ValueError, match="--partitions: checkpoint has 24, now 12"):
        check_resume(saved, _cursor(samples=32), resolve(replace(cfg, partitions=12), shards), "ckpt")
    older = {**saved, "train": {k: v for k, v in saved["train"].items() if k != "partitions"}}
    check_resume(older, _cursor(samples=0), resolve(cfg, shards), "ckpt")
    with pytest.raises(ValueError, match="mid-epoch .* written by an older distill"):
        check_resume(older, _cursor(samples=32), resolve(cfg, shards), "ckpt")


def test_shards_with_no_labelled_row_turn_the_classifier_off_and_say_so(tmp_path, caplog):
    free = open_shards(str(write_toy_shards(tmp_path / "free", rows=32, shard_size=16, unlabelled=1.0)))
    assert free.num_classes == 0
    with caplog.at_level("WARNING"):
        config = resolve(TrainConfig(shards=free.location, out="o", ce_weight=1.0, margin="teacher"), free)
    assert "no labelled rows" in caplog.text
    assert (config.loss.ce_weight, config.loss.margin) == (0.0, "softmax")
    assert config.student.num_classes == 0
    with pytest.raises(ValueError, match="no labelled rows.*only term"):
        resolve(TrainConfig(shards=free.location, out="o", ce_weight=1.0, distill_weight=0.0, contrast_weight=0.0,
                                pair_weight=0.0), free)
    mixed = open_shards(str(write_toy_shards(tmp_path / "mixed", rows=32, shard_size=16, unlabelled=0.5)))
    assert resolve(TrainConfig(shards=mixed.location, out="o", ce_weight=1.0), mixed).loss.ce_weight == 1.0


def test_the_student_is_chosen_and_its_width_defaults_per_backbone(shards):
    mfn = resolve(TrainConfig(shards=shards.location, out="o"), shards).student
    assert (mfn.arch, mfn.width) == ("mobilefacenet", 1.0)  # the default student
    assert mfn.resolution is None  # the CPU default, 64, is not below these 32 px shards' side: as they are
    assert resolve(TrainConfig(shards=shards.location, out="o", student="mobilenetv2"), shards).student.width == 0.5
    assert working_resolution(64, (112, 112)) == 64 and working_resolution(112, (112, 112)) is None
    with pytest.raises(ValueError, match="--student"):
        TrainConfig(shards="s", out="o", student="resnet")
    with pytest.raises(ValueError, match="MobileNetV2 weights"):
        TrainConfig(shards="s", out="o", student="mobilefacenet", init="backbone.h5")


def test_the_working_resolution_defaults_to_64_px_on_cpus_and_the_images_own_side_on_gpus(tmp_path):
    faces = open_shards(str(write_toy_shards(tmp_path / "s", rows=8, shard_size=8, size=112)))
    def side(**kw):
        return resolve(TrainConfig(shards=faces.location, out="o", **kw), faces).student.resolution

    assert (default_resolution(False), default_resolution(True)) == (64, None)
    assert side() == 64 and side(use_gpu=True) is None  # None: the 112x112 images as they are
    assert side(resolution=80) == side(resolution=80, use_gpu=True) == 80  # given: taken as given
    assert side(resolution=112) is None and side(resolution=500, use_gpu=True) is None
    # A CPU run resumed on GPUs with the same options would change the graph: refused, naming the option.
    cpu = TrainConfig(shards=faces.location, out="o", batch_size=4)
    with pytest.raises(IncompatibleRun, match=r"--resolution: checkpoint has 64, now the images' own side \(112\)"):
        check_resume(_saved(cpu, faces, 8), _cursor(), resolve(replace(cpu, use_gpu=True), faces), "ckpt")
    check_resume(_saved(cpu, faces, 8), _cursor(), resolve(replace(cpu, use_gpu=True, resolution=64), faces), "ckpt")


def test_config_refuses_bad_options_with_the_flag_name():
    with pytest.raises(ValueError, match="--batch-size 30 must be a multiple of --workers 4"):
        TrainConfig(shards="s", out="o", batch_size=30, workers=4)
    with pytest.raises(ValueError, match="5 workers do not divide --partitions 24"):
        TrainConfig(shards="s", out="o", batch_size=40, workers=5)
    with pytest.raises(ValueError, match="--mixed-precision needs --use-gpu"):
        TrainConfig(shards="s", out="o", mixed_precision=True)
    with pytest.raises(ValueError, match="--checkpoint-every"):
        TrainConfig(shards="s", out="o", checkpoint_every=0)


def test_validation_sets_are_named_by_file_and_best_by_picks_one_of_them():
    cfg = TrainConfig(shards="s", out="o", val_bin="/data/lfw.bin, /data/cfp_fp.bin", val_every=500)
    assert cfg.val_bins == (("lfw", "/data/lfw.bin"), ("cfp_fp", "/data/cfp_fp.bin")) and cfg.validates
    assert cfg.best_key == "val_lfw_acc"  # no held-out people: the first set
    assert TrainConfig(shards="s", out="o", val_split=0.1, val_bin="lfw.bin").best_key == "val_auc"
    assert TrainConfig(shards="s", out="o", val_split=0.1, val_bin="lfw.bin", best_by="lfw").best_key == "val_lfw_acc"
    assert TrainConfig(shards="s", out="o").best_key is None
    with pytest.raises(ValueError, match="--best-by agedb_30: this run validates on held-out, lfw"):
        TrainConfig(shards="s", out="o", val_split=0.1, val_bin="lfw.bin", best_by="agedb_30")
    with pytest.raises(ValueError, match="two are called the same: lfw, lfw"):
        TrainConfig(shards="s", out="o", val_bin="a/lfw.bin,b/lfw.bin")
    with pytest.raises(ValueError, match="--val-every needs something to validate on"):
        TrainConfig(shards="s", out="o", val_every=100)


def test_schedule_spans_the_planned_run():
    train = asdict(TrainConfig(shards="s", out="o", epochs=3, batch_size=10, warmup_steps=5))
    assert lr_schedule(train, 105) == Schedule(kind="cosine", lr=0.004, warmup_steps=5, decay_steps=25, train_rows=105)
    assert lr_schedule({**train, "max_steps": 7}, 105) == lr_schedule(train, 105)  # it only stops early
    assert lr_schedule({**train, "epochs": 1, "warmup_steps": 50}, 105).warmup_steps == 9  # never the whole run
    assert lr_schedule({**train, "lr_schedule": "constant"}, 105).decay_steps is None


def test_the_resolved_run_round_trips_through_its_checkpoint_form(shards):
    run = resolve(TrainConfig(shards=shards.location, out="o", batch_size=16, student="mobilenetv2"), shards)
    run = run.with_schedule(64)
    saved = json.loads(json.dumps(run.to_json()))
    assert TrainRun.from_json(saved) == run
    older = {**saved, "train": {**{k: v for k, v in saved["train"].items() if k not in ("student", "resolution")},
                                "gone_option": 1},
             "student": {k: v for k, v in saved["student"].items() if k not in ("arch", "resolution")}}
    back = TrainRun.from_json(older)  # saved before --student: the MobileNetV2 it trained, not today's default
    assert (back.train.student, back.student.arch) == ("mobilenetv2", "mobilenetv2")
    # ... at the images' own side (no --resolution then), whatever today's default is:
    assert back.train.resolution == 32 and back.student.resolution is None
    assert resolve(back.train, shards).student == back.student
    renamed = {**saved, "train": {**{k: v for k, v in saved["train"].items() if k != "distill_weight"}, "mse_weight": 0.5},
               "loss": {**{k: v for k, v in saved["loss"].items() if k != "distill_weight"}, "mse_weight": 0.5}}
    back = TrainRun.from_json(renamed)  # a run saved before --mse-weight became --distill-weight
    assert back.train.distill_weight == 0.5 and back.loss.distill_weight == 0.5


def test_weights_that_are_not_numbers_are_named_and_integer_state_is_not_judged():
    state = {"model/dense/kernel": np.ones((2, 2), np.float32), "optimizer/iteration": np.array(5, np.int64),
             "model/bn/moving_variance": np.array([1.0, np.inf], np.float32),
             "optimizer/dense/kernel_momentum": np.array([np.nan], np.float32)}
    assert not_finite(state) == ["model/bn/moving_variance", "optimizer/dense/kernel_momentum"]
    assert not_finite({k: v for k, v in state.items() if k in ("model/dense/kernel", "optimizer/iteration")}) == []


def test_checkpoints_are_renamed_into_place_and_only_the_last_few_kept(tmp_path):
    store = LocalCheckpoints(str(tmp_path), keep=2)
    stale = tmp_path / "checkpoints" / ".ckpt-dead.tmp"  # a save killed before its rename
    stale.mkdir(parents=True)
    assert store.latest() is None
    for step in (3, 6, 9, 9):
        store.save({"model.00000": np.full(2, step)}, {"k": step}, _cursor(step=step), {})
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["ckpt-000000006", "ckpt-000000009"]
    config, cursor = read_checkpoint(store.latest())
    assert cursor.step == 9 and config == {"k": 9}
    with np.load(os.path.join(store.latest(), "state.npz")) as z:
        assert z["model.00000"].tolist() == [9, 9]


def test_a_ray_train_checkpoint_is_adopted_into_a_local_out_whole(tmp_path):
    """Ray Train's checkpoint (under OUT/ray) is copied into OUT/checkpoints at its own step,
    where export and a one-process rerun look; the last few kept as for the run's own saves."""
    store = LocalCheckpoints(str(tmp_path / "out"), keep=2)
    store.save({"model.00000": np.zeros(2)}, {"k": 3}, _cursor(step=3), {})
    ray_ckpt = tmp_path / "out" / "ray" / "train" / "checkpoint_2026-12-06_21-14-05.461164"
    ray_ckpt.mkdir(parents=True)
    from distill.train.checkpoints import write_checkpoint_files

    write_checkpoint_files(str(ray_ckpt), {"model.00000": np.full(2, 7.0)}, {"k": 7}, _cursor(step=7, world_size=2))
    final = store.adopt(str(ray_ckpt))
    assert final == store.latest() == str(tmp_path / "out" / "checkpoints" / "ckpt-000000007")
    assert sorted(os.listdir(tmp_path / "out" / "checkpoints")) == ["ckpt-000000003", "ckpt-000000007"]
    assert sorted(os.listdir(final)) == sorted(os.listdir(ray_ckpt))
    config, cursor = read_checkpoint(final)
    assert config == {"k": 7} and (cursor.step, cursor.world_size) == (7, 2)
    with np.load(os.path.join(final, "state.npz")) as z:
        assert z["model.00000"].tolist() == [7.0, 7.0]
    assert ray_ckpt.is_dir()  # Ray Train's own stays where Ray Train keeps it


def test_trim_drops_records_past_the_checkpoint_and_a_torn_last_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    _trim_jsonl(str(p), 5)
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_shards_without_views_are_said_once_as_the_measured_default_not_a_loss(shards):
    """The note follows docs/QUALITY.md: views help on faces unlike the training faces only, so
    none are stored by default; nothing to say when the shards hold views or none are asked for."""
    from distill.train.config import views_note

    run = resolve(TrainConfig(shards=shards.location, out="o"), shards)  # (toy shards: no views)
    note = views_note(run)
    assert note.startswith(f"the shards in {shards.location} hold no teacher views") and "That is the default" in note
    assert "unlike the training faces" in note and "--views 4" in note and "measured best" not in note
    assert views_note(resolve(TrainConfig(shards=shards.location, out="o", view_prob=0.0), shards)) is None
    assert views_note(replace(run, view_prob=0.75)) is None  # (shards with views: trained on)


def test_options_of_a_term_that_is_off_are_named_as_changing_nothing():
    from distill.train.losses import LossSpec, unused_options

    assert unused_options(LossSpec()) == []
    assert unused_options(LossSpec(pair_weight=2.0, pair_cap=0.1, distill_hardness=1.0)) == []
    assert unused_options(LossSpec(pair_weight=0.0)) == []  # the default term turned off, nothing else changed
    assert unused_options(LossSpec(pair_weight=0.0, pair_cap=0.5, pair_focus="teacher")) == [
        "--pair-focus, --pair-cap change nothing: --pair-weight is 0, so its term is off"]
    assert unused_options(LossSpec(contrast_temperature=0.2)) == [
        "--contrast-temperature changes nothing: --contrast-weight is 0, so its term is off"]
    assert unused_options(LossSpec(distill_weight=0, contrast_weight=1.0, distill="cosine", distill_quality=2.0,
                                   contrast_temperature=0.2)) == [
        "--distill-loss, --distill-quality change nothing: --distill-weight is 0, so its term is off"]
