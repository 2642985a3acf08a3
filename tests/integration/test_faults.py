"""The fault campaign (`bench/faults.py`), short: one seeded random SIGKILL of the embed
driver, checked by the campaign itself against an uninterrupted run (every shard's bytes, every
row once). The full campaign (every kind, training too) is in docs/BENCHMARKS.md; each kind
also has a fixed-moment test of its own in test_embed.py / test_train.py."""

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
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "faults.py"), "--trials", "embed-kill=1",
                        "--seed", "3", "--images", "96", "--json", str(out), "--work", str(tmp_path / "work"),
                        "--allow-busy", "--idle-wait", "0"],
                       capture_output=True, text=True, timeout=900, env={**os.environ, **CHILD_ENV})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    trials = json.loads(out.read_text())
    assert [(t["kind"], t["ok"]) for t in trials] == [("embed-kill", True)]
    assert "1/1 trials passed" in r.stdout
