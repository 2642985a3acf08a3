"""Quality gates (parsing, judging results) and what evaluate says of the models: pure, no model."""

from __future__ import annotations

import pytest

from distill.errors import BadOption
from distill.evaluate.gates import Gate, judge, parse_gates
from distill.evaluate.run import EvaluateConfig, _report_gates, _tar_gap


def results(model: dict, teacher: dict | None = None, impostors: int = 200_000) -> dict:
    models = {"model": {"tar_at_far": model}}
    if teacher is not None:
        models["teacher"] = {"tar_at_far": teacher}
    return {"targets": [{"models": models, "dataset": {"path": "glint12", "impostor_pairs": impostors}}]}


def test_gates_parse_the_reported_operating_points_only():
    assert parse_gates("1e-3=0.6, 0.0001=0.3", "min_tar") == (Gate("min_tar", 1e-3, 0.6), Gate("min_tar", 1e-4, 0.3))
    assert str(parse_gates("1e-2=0.05", "max_tar_gap")[0]) == "--max-tar-gap 1e-02=0.05"
    assert parse_gates(None, "min_tar") == parse_gates("", "min_tar") == ()
    for text, match in [("1e-3", "expected FAR=VALUE"), ("x=0.5", "expected FAR=VALUE"), ("1e-3=nan", "FAR=VALUE"),
                        ("1e-5=0.5", "one of 1e-02, 1e-03, 1e-04"), ("1e-3=1.5", r"in \[0, 1\]")]:
        with pytest.raises(BadOption, match=match):
            parse_gates(text, "min_tar")


def test_min_tar_passes_at_the_bound_and_fails_below_it():
    got = judge(results({"1e-03": 0.6, "1e-04": 0.29}), parse_gates("1e-3=0.6,1e-4=0.3", "min_tar"))
    assert [(v["gate"], v["passed"]) for v in got] == [("--min-tar 1e-03=0.6", True), ("--min-tar 1e-04=0.3", False)]
    assert got[1]["reason"] == "TAR@1e-04 0.2900 < 0.3"


def test_a_far_the_pairs_cannot_support_fails_the_gate_with_the_reason():
    (v,) = judge(results({"1e-03": 0.9, "1e-04": None}, impostors=5_000), parse_gates("1e-4=0.1", "min_tar"))
    assert v["passed"] is False
    assert v["reason"] == ("TAR@1e-04 is not supported by this set's 5,000 distinct impostor pairs (it needs "
                           "100,000): the gate cannot pass on it")


def test_the_gap_gate_compares_with_the_teacher():
    gate = parse_gates("1e-3=0.25", "max_tar_gap")
    (ok,) = judge(results({"1e-03": 0.62}, {"1e-03": 0.86}), gate)
    (bad,) = judge(results({"1e-03": 0.35}, {"1e-03": 0.86}), gate)
    (alone,) = judge(results({"1e-03": 0.35}), gate)
    assert (ok["passed"], bad["passed"], alone["passed"]) == (True, False, False)
    assert bad["reason"] == "TAR@1e-03 gap 0.5100 (teacher 0.8600, model 0.3500) > 0.25"
    assert alone["reason"] == "no teacher to compare with: pass --teacher"


def test_the_exit_code_is_1_when_any_verdict_failed(capsys):
    verdicts = judge(results({"1e-03": 0.5}), parse_gates("1e-3=0.4", "min_tar"))
    assert _report_gates(verdicts) == 0
    assert _report_gates(judge(results({"1e-03": 0.5}), parse_gates("1e-3=0.6", "min_tar"))) == 1
    out = capsys.readouterr()
    assert "gate --min-tar 1e-03=0.6 on glint12: FAIL: TAR@1e-03 0.5000 < 0.6" in out.out
    assert "1 of 1 quality gate verdicts failed" in out.err
    assert _report_gates([]) == 0


def test_the_table_shows_the_gap_where_both_tars_are_supported():
    models = results({"1e-02": 0.8, "1e-03": 0.35, "1e-04": None}, {"1e-02": 0.95, "1e-03": 0.86, "1e-04": 0.7})
    assert _tar_gap(models["targets"][0]["models"]) == "at FAR 1e-02 +0.1500, at FAR 1e-03 +0.5100"
    assert _tar_gap(results({"1e-03": 0.3})["targets"][0]["models"]) == ""


def test_gates_are_checked_before_any_model_loads(tmp_path):
    with pytest.raises(BadOption, match="--max-tar-gap compares the model with its teacher"):
        EvaluateConfig(model="m", folders="f", max_tar_gap="1e-3=0.2")
    with pytest.raises(BadOption, match="one of 1e-02"):
        EvaluateConfig(model="m", folders="f", min_tar="1e-6=0.2")
    assert EvaluateConfig(model="m", folders="f", min_tar="1e-3=0.5").gates == (Gate("min_tar", 1e-3, 0.5),)


def test_the_resolution_a_student_computes_at_is_said_where_it_differs_from_its_input():
    from distill.evaluate.export import computes_at
    from distill.evaluate.run import format_table

    assert computes_at(64, (112, 112)) == "computes at 64x64: resizes its 112x112 input inside"
    assert computes_at(None, (112, 112)) == computes_at(112, (112, 112)) == "computes at 112x112, its input size"
    assert format_table({"kinds": {}, "targets": [], "computes_at": {}}) == ""
    head = format_table({"kinds": {"model": "student"}, "targets": [], "computes_at": {"model": computes_at(64, (112, 112))}})
    assert head == "model: student, computes at 64x64: resizes its 112x112 input inside"
