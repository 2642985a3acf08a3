"""Options derived from the config dataclasses: each default lives once."""

from __future__ import annotations

import argparse
import dataclasses
import os

import pytest

from distill.options import add_options, config_from_args, dump_toml, load_config_file
from distill.train.config import TrainConfig


def _parser(config_file: bool = True):
    p = argparse.ArgumentParser()
    add_options(p, TrainConfig, config_file=config_file)
    return p


def test_train_options_default_to_the_config_fields():
    args = _parser().parse_args(["RUN/shards", "--out", "RUN/student"])
    cfg = config_from_args(TrainConfig, args)
    assert cfg == TrainConfig(os.path.abspath("RUN/shards"), os.path.abspath("RUN/student"))


def test_every_kind_of_field_parses():
    args = _parser().parse_args(["s", "--out", "o", "--epochs", "3", "--lr", "0.5", "--margin", "teacher",
                                 "--ce-weight", "0.2", "--no-flip", "--use-gpu", "--val-folders", "/v", "--max-steps", "7"])
    cfg = config_from_args(TrainConfig, args)
    assert (cfg.epochs, cfg.lr, cfg.margin, cfg.flip, cfg.use_gpu, cfg.val_folders, cfg.max_steps) == (
        3, 0.5, "teacher", False, True, "/v", 7)
    with pytest.raises(SystemExit):
        _parser().parse_args(["s", "--out", "o", "--margin", "cosface"])  # choices come from the module's list
    with pytest.raises(SystemExit):
        _parser(config_file=False).parse_args(["s"])  # --out is required
    with pytest.raises(ValueError, match="give --out"):  # ... from the command line or the --config file
        config_from_args(TrainConfig, _parser().parse_args(["s"]))


def test_help_states_each_default():
    text = _parser().format_help()
    for f in dataclasses.fields(TrainConfig):
        if f.default not in (None, dataclasses.MISSING) and not isinstance(f.default, bool):
            assert f"default: {f.default}" in " ".join(text.split()), f.name


def test_embed_options_default_to_the_config_and_the_dataclasses_it_holds():
    from distill.cli import build_parser
    from distill.embed.run import EmbedConfig, config_from_args

    args = build_parser().parse_args(["embed", "L", "--teacher", "s3://b/T", "--out", "O"])
    assert config_from_args(args) == EmbedConfig(os.path.abspath("L"), "s3://b/T", os.path.abspath("O"))
    args = build_parser().parse_args(["embed", "L", "--teacher", "T", "--out", "O", "--no-images", "--no-flip",
                                      "--shard-size", "8", "--channel-order", "BGR", "--worker-resource", "tpu=2"])
    cfg = config_from_args(args)
    assert (cfg.images, cfg.flip, cfg.shard_size, cfg.preprocessing.channel_order, cfg.worker_resources) == (
        False, False, 8, "BGR", (("tpu", 2.0),))


def test_a_config_file_round_trips_through_print_config(tmp_path):
    cfg = TrainConfig(str(tmp_path / "RUN/shards"), "s3://b/RUN/student", epochs=3, lr=0.01, student="mobilefacenet", resolution=80,
                      flip=False, val_folders="/v", margin="arcface")
    text = dump_toml(cfg)
    (tmp_path / "c.toml").write_text(text)
    back = config_from_args(TrainConfig, _parser().parse_args(["--config", str(tmp_path / "c.toml")]))
    assert back == cfg and dump_toml(back) == text
    (tmp_path / "c.yaml").write_text("shards: RUN/shards\nout: RUN/student\nepochs: 3\nlr: 1\n")
    assert load_config_file(TrainConfig, str(tmp_path / "c.yaml"))["lr"] == 1.0  # an int where a float goes


@pytest.mark.parametrize("text,match", [
    ("epochz = 3\n", r"unknown option 'epochz' \(did you mean 'epochs'\?\)"),
    ("epochs = 'ten'\n", "epochs = 'ten' is not an int"),
    ("flip = 1\n", "flip = 1 is not a bool"),
    ("margin = 'cosface'\n", "is not one of softmax, arcface, teacher"),
    ("epochs = [\n", "not valid TOML"),
    ("lr = nan\n", "lr = nan is not a finite number"),
    ("ce_weight = -inf\n", "ce_weight = -inf is not a finite number"),
])
def test_a_config_file_is_refused_naming_the_key(tmp_path, text, match):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config_file(TrainConfig, str(tmp_path / "c.toml"))


@pytest.mark.parametrize("flag, value, said", [
    ("--lr", "nan", "nan is not a finite number"), ("--ce-weight", "inf", "inf is not a finite number"),
    ("--width", "Infinity", "Infinity is not a finite number"), ("--lr", "fast", "'fast' is not a number"),
])
def test_a_float_option_is_a_finite_number(capsys, flag, value, said):
    # (float() takes nan and inf, and every comparison with nan is false: a range check lets it by)
    with pytest.raises(SystemExit):
        _parser().parse_args(["s", "--out", "o", flag, value])
    assert f"argument {flag}: {said}" in capsys.readouterr().err
    assert _parser().parse_args(["s", "--out", "o", flag, "1e-3"]).__dict__[flag[2:].replace("-", "_")] == 1e-3


def test_a_flag_beside_the_file_wins_and_says_so(tmp_path, caplog):
    (tmp_path / "c.toml").write_text('shards = "s"\nout = "o"\nepochs = 3\nlr = 0.01\n')
    with caplog.at_level("INFO"):
        cfg = config_from_args(TrainConfig, _parser().parse_args(["--config", str(tmp_path / "c.toml"), "--epochs", "5"]))
    assert (cfg.epochs, cfg.lr, cfg.out) == (5, 0.01, str(tmp_path / "o"))  # (beside the file that names it)
    assert "--epochs 5 overrides epochs = 3" in caplog.text


def test_the_distillation_weight_keeps_its_old_name(tmp_path):
    cfg = config_from_args(TrainConfig, _parser().parse_args(["s", "--out", "o", "--mse-weight", "0.5"]))
    assert cfg.distill_weight == 0.5 and cfg.loss_spec().distill_weight == 0.5
    (tmp_path / "c.toml").write_text('shards = "s"\nout = "o"\nmse_weight = 0.25\n')
    assert load_config_file(TrainConfig, str(tmp_path / "c.toml")) == {"shards": "s", "out": "o", "distill_weight": 0.25}


def test_paths_resolve_from_where_they_were_written(tmp_path, monkeypatch):
    """On the command line: from the current folder. In a --config file: from the file's folder.
    Object-store URIs stay as they are, and each of a comma-separated list resolves."""
    monkeypatch.chdir(tmp_path)
    args = _parser().parse_args(["RUN/shards", "--out", "../elsewhere/student", "--val-bin", "a.bin,s3://b/c.bin",
                                 "--init", "~/weights"])
    cfg = config_from_args(TrainConfig, args)
    assert cfg.shards == str(tmp_path / "RUN/shards") and cfg.out == str(tmp_path.parent / "elsewhere/student")
    assert cfg.val_bin == f"{tmp_path / 'a.bin'},s3://b/c.bin" and cfg.init == os.path.expanduser("~/weights")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "c.toml").write_text('shards = "../RUN/shards"\nout = "student"\n')
    monkeypatch.chdir("/")
    cfg = config_from_args(TrainConfig, _parser().parse_args(["--config", str(tmp_path / "conf" / "c.toml")]))
    assert (cfg.shards, cfg.out) == (str(tmp_path / "RUN/shards"), str(tmp_path / "conf/student"))
    # --print-config writes absolute paths: the file works from any folder
    assert f'shards = "{tmp_path / "RUN/shards"}"' in dump_toml(cfg)


def test_a_positional_input_may_be_given_as_a_flag():
    """`--shards DIR` reads as the positional SHARDS, as export and evaluate spell it."""
    cfg = config_from_args(TrainConfig, _parser().parse_args(["--shards", "/r/shards", "--out", "/r/s"]))
    assert cfg.shards == "/r/shards"
    with pytest.raises(ValueError, match=r"give SHARDS \(or --shards SHARDS\)"):
        config_from_args(TrainConfig, _parser(config_file=False).parse_args(["--out", "/r/s"]))
