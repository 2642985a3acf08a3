"""`distill demo --quick` end to end through the real CLI: killed mid-run, rerun, rerun again.

The first run is SIGKILLed once the embed stage is recorded (as training starts); the
second must reuse the finished stages, resume the rest and finish; the third must reuse
everything. The summary JSON is the contract checked: every stage ran, the student
separates held-out identities well above chance, the outputs exist.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_cli

pytestmark = pytest.mark.integration

STAGES = ("data", "teacher", "listing", "embed", "train", "export", "evaluate")


def _stages_recorded(out) -> set[str]:
    try:
        with open(out / "demo.json") as f:
            return set(json.load(f)["stages"])
    except (FileNotFoundError, json.JSONDecodeError):
        return set()


def test_demo_quick_killed_resumed_and_reused(tmp_path, ray_address):
    out = tmp_path / "demo-run"
    # --quick with 4 student epochs, not its 12: held-out AUC ~0.83 then (0.87 after 12), far above
    # the 0.65 asked below; what is tested is the kill, the resume and the reuse.
    args = ["demo", "--quick", "--epochs", "4", "--out", str(out), "--address", ray_address, "--no-progress"]

    first = subprocess.Popen([sys.executable, "-m", "distill", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        while "embed" not in _stages_recorded(out) and first.poll() is None:
            time.sleep(0.1)
        assert first.poll() is None, "the first demo run ended before it could be interrupted"
        first.send_signal(signal.SIGKILL)  # as training starts: kill the driver without warning
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert _stages_recorded(out) == {"data", "teacher", "listing", "embed"}

    proc = run_cli(*args, timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    assert [summary["stages"][s]["status"] for s in STAGES] == ["reused"] * 4 + ["ran"] * 3
    for s in STAGES:
        assert summary["stages"][s]["output"] and os.path.exists(summary["stages"][s]["output"])
    assert summary["stages"]["train"]["steps"] > 0
    assert summary["stages"]["embed"]["shards"] >= 1

    v = summary["verification"]
    assert v["identities"] == 8 and v["images"] == 64
    assert v["teacher"]["auc"] > 0.7
    assert v["student"]["auc"] > 0.65  # chance is 0.5; unseen identities, a few hundred steps
    assert v["mean_cosine"] is not None and v["mean_cosine"] > 0.0
    outputs = summary["outputs"]
    assert os.path.isfile(os.path.join(outputs["export"], "saved_model", "saved_model.pb"))
    assert os.path.isfile(os.path.join(outputs["teacher"], "saved_model.pb"))
    assert os.path.isfile(os.path.join(outputs["shards"], "manifest.json"))
    assert os.path.isfile(outputs["evaluation"])
    assert "ROC-AUC" in proc.stdout and "student" in proc.stdout and outputs["export"] in proc.stdout

    again = run_cli(*args, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert all(summary["stages"][s]["status"] == "reused" for s in STAGES)
    assert summary["verification"] == v
    assert "reused" in again.stdout
