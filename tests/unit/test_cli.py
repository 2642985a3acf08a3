"""The CLI shell: TensorFlow's C++ import chatter is kept off the terminal, nothing else is."""

import os
import subprocess
import sys

from distill.cli import _TF_IMPORT_CHATTER, TF_STAGES, build_parser

ABSL = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
ONEDNN = ("I0000 00:00:1795992532.138975   13326 port.cc:153] oneDNN custom operations are on. You may see slightly "
          "different numerical results due to floating-point round-off errors from different computation orders.")


def test_only_tensorflows_info_and_warning_notices_are_filtered():
    assert _TF_IMPORT_CHATTER.match(ABSL)
    assert _TF_IMPORT_CHATTER.match(ONEDNN)
    assert _TF_IMPORT_CHATTER.match(ONEDNN.replace("I0000", "W0000"))
    for kept in (
        ONEDNN.replace("I0000", "E0000"),  # errors always reach the user
        "Traceback (most recent call last):",
        "ImportError: libcudart.so.12: cannot open shared object file",
        "2026-11-29 22:49:27,555 INFO distill.embed: embedding 400 rows",
    ):
        assert not _TF_IMPORT_CHATTER.match(kept), kept


def test_tf_stages_are_real_subcommands():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert TF_STAGES <= commands


def _import_stderr(level: str) -> str:
    code = "from distill.cli import import_tensorflow_quietly; import_tensorflow_quietly(); import tensorflow"
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
