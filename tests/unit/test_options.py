"""Options derived from the config dataclasses: each default lives once."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from distill.options import add_options, config_from_args
from distill.train.config import TrainConfig


def _parser():
    p = argparse.ArgumentParser()
    add_options(p, TrainConfig)
    return p


def test_train_options_default_to_the_config_fields():
    args = _parser().parse_args(["RUN/shards", "--out", "RUN/student"])
    cfg = config_from_args(TrainConfig, args)
    assert cfg == TrainConfig("RUN/shards", "RUN/student")


def test_every_kind_of_field_parses():
    args = _parser().parse_args(["s", "--out", "o", "--epochs", "3", "--lr", "0.5", "--margin", "teacher",
                                 "--ce-weight", "0.2", "--no-flip", "--use-gpu", "--val-folders", "/v", "--max-steps", "7"])
    cfg = config_from_args(TrainConfig, args)
    assert (cfg.epochs, cfg.lr, cfg.margin, cfg.flip, cfg.use_gpu, cfg.val_folders, cfg.max_steps) == (
        3, 0.5, "teacher", False, True, "/v", 7)
    with pytest.raises(SystemExit):
        _parser().parse_args(["s", "--out", "o", "--margin", "cosface"])  # choices come from the module's list
    with pytest.raises(SystemExit):
        _parser().parse_args(["s"])  # --out is required


def test_help_states_each_default():
    text = _parser().format_help()
    for f in dataclasses.fields(TrainConfig):
        if f.default not in (None, dataclasses.MISSING) and not isinstance(f.default, bool):
            assert f"default: {f.default}" in " ".join(text.split()), f.name


def test_embed_options_default_to_the_config_and_the_dataclasses_it_holds():
    from distill.cli import build_parser
    from distill.embed.run import EmbedConfig, config_from_args

    args = build_parser().parse_args(["embed", "L", "--teacher", "T", "--out", "O"])
    assert config_from_args(args) == EmbedConfig("L", "T", "O")
    args = build_parser().parse_args(["embed", "L", "--teacher", "T", "--out", "O", "--no-images", "--no-flip",
                                      "--shard-size", "8", "--channel-order", "BGR", "--worker-resource", "tpu=2"])
    cfg = config_from_args(args)
    assert (cfg.images, cfg.flip, cfg.shard_size, cfg.preprocessing.channel_order, cfg.worker_resources) == (
        False, False, 8, "BGR", (("tpu", 2.0),))
