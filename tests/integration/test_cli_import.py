"""The TensorFlow import in a real process: its C++ notices are filtered from stderr, and only
because of the filter (with TF_CPP_MIN_LOG_LEVEL=0 nothing is)."""

import os
import subprocess
import sys

import pytest

from distill.startup import _TF_IMPORT_CHATTER

pytestmark = pytest.mark.integration


def _import_stderr(level: str) -> str:
    code = "from distill.startup import import_tensorflow_quietly; import_tensorflow_quietly(); import tensorflow"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": level})
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def chatter(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if _TF_IMPORT_CHATTER.match(line)]


def test_import_is_quiet_and_level_zero_still_shows_everything():
    assert chatter(_import_stderr("2")) == []
    # The filter is what removes it: with TF_CPP_MIN_LOG_LEVEL=0 nothing is filtered.
    assert chatter(_import_stderr("0")), "this TensorFlow prints no import notices: import_tensorflow_quietly may go"
