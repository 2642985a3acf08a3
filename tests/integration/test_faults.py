"""The fault campaign (`bench/faults.py`), short: two seeded random kills, checked by the
campaign itself against uninterrupted runs (bytes for the teacher pass, the samples of every
global batch for training). The full campaign's figures are in docs/BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support import CHILD_ENV, ROOT

pytestmark = pytest.mark.integration


def test_a_short_fault_campaign_passes(tmp_path):
    out = tmp_path / "faults.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "faults.py"), "--trials", "embed-kill=1,train-term=1",
                        "--seed", "3", "--images", "128", "--json", str(out), "--work", str(tmp_path / "work"),
                        "--allow-busy", "--idle-wait", "0"],
                       capture_output=True, text=True, timeout=900, env={**os.environ, **CHILD_ENV})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    trials = json.loads(out.read_text())
    assert [(t["kind"], t["ok"]) for t in trials] == [("embed-kill", True), ("train-term", True)]
    assert "2/2 trials passed" in r.stdout
