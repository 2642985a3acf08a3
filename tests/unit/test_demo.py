"""The demo's pure decisions: presets and overrides, refusing a mixed run, reuse, the table."""

from __future__ import annotations

import pytest

from distill.demo import (
    QUICK,
    STAGES,
    DemoConfig,
    check_same_run,
    format_summary,
    identity,
    paths,
    per_second,
    resolve_config,
    stage_actions,
)


def test_quick_preset_then_explicit_options_win():
    cfg = resolve_config({"out": "x", "epochs": 3, "seed": None}, quick=True)
    assert cfg.out == "x" and cfg.epochs == 3
    assert cfg.size == QUICK["size"] and cfg.identities == QUICK["identities"]
    assert resolve_config({}, quick=False) == DemoConfig()


def test_config_refuses_what_cannot_make_pairs_or_batches():
    with pytest.raises(ValueError, match="^--identities must be at least 2"):
        DemoConfig(identities=1)
    with pytest.raises(ValueError, match="^--heldout-per-identity must be at least 2"):  # (the one given, by name)
        DemoConfig(heldout_per_identity=1)
    with pytest.raises(ValueError, match="--batch-size"):
        DemoConfig(identities=2, per_identity=3, batch_size=32)


def test_same_run_check_ignores_where_and_how_but_not_what():
    cfg = DemoConfig(out="a")
    state = {"config": identity(cfg)}
    check_same_run(None, cfg)
    check_same_run(state, DemoConfig(out="b", address="127.0.0.1:1", progress=False))
    with pytest.raises(ValueError, match=r"epochs: 8 -> 9.*another --out"):
        check_same_run(state, DemoConfig(out="a", epochs=9))


def test_finished_stages_are_reused_and_the_rest_run():
    actions = stage_actions({"data", "teacher", "listing"})
    assert list(actions) == list(STAGES)
    assert [s for s, a in actions.items() if a == "reuse"] == ["data", "teacher", "listing"]
    assert all(a == "run" for s, a in actions.items() if s not in ("data", "teacher", "listing"))


def test_per_second_has_no_rate_without_work():
    assert per_second(100, 4.0) == 25.0
    assert per_second(0, 4.0) is None and per_second(10, 0.0) is None


def test_summary_table_names_every_stage_and_both_models():
    p = paths("/tmp/run")
    summary = {
        "stages": {
            s: {"status": "ran" if s != "data" else "reused", "seconds": 2.0, "images": 100, "images_per_second": 50.0,
                "output": f"/tmp/run/{s}"}
            for s in STAGES
        },
        "seconds": 14.0,
        "verification": {
            "identities": 8, "images": 64, "pairs": 2016, "same_pairs": 224, "chance_accuracy": 0.8889,
            "teacher": {"auc": 0.88, "accuracy_mean": 0.9, "accuracy_std": 0.02, "threshold_cosine": 0.5,
                        "collapse_warning": None},
            "student": {"auc": 0.81, "accuracy_mean": 0.89, "accuracy_std": 0.03, "threshold_cosine": 0.6,
                        "collapse_warning": "every pair scores about the same cosine"},
            "mean_cosine": 0.42,
        },
        "outputs": p,
    }
    text = format_summary(summary)
    for s in STAGES:
        assert f"/tmp/run/{s}" in text
    assert "reused" in text and "0.8800" in text and "0.8100" in text and "0.4200" in text
    assert p["export"] in text and "distill evaluate" in text
    assert "0.8900 +- 0.0300" in text and "WARNING student: every pair scores about the same cosine" in text
    assert "WARNING teacher" not in text
