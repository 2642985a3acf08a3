"""A checkout runs without being installed: shards/ and workers/ import as distill.shards and
distill.workers from the source tree alone (a real `python -S`)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.integration


def test_a_checkout_runs_without_being_installed():
    # -S: no site-packages, so no editable install either: only the checkout on sys.path.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import distill.shards.plan, distill.workers; "
            "print(distill.shards.plan.__file__); print(distill.workers.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT)], check=True, capture_output=True, text=True,
                         timeout=60).stdout.split()
    assert out == [str(ROOT / "shards" / "plan.py"), str(ROOT / "workers" / "__init__.py")]
