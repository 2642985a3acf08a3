"""The CLI shell: TensorFlow's C++ import chatter is kept off the terminal, user errors print as one
line, bugs keep their traceback."""

import os
import sys

import pytest

from distill.cli import build_parser
from distill.startup import _TF_IMPORT_CHATTER

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
        "2026-11-29 22:49:27,555 INFO distill.embed.run: embedding 400 rows",
    ):
        assert not _TF_IMPORT_CHATTER.match(kept), kept


def test_every_stage_is_a_subcommand():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert {"listing", "embed", "status", "export-npy", "ledger", "train", "export", "evaluate", "demo"} <= commands


def _parser_raising(error: BaseException):
    import argparse

    def build():
        ap = argparse.ArgumentParser(prog="distill")
        ap.add_argument("-v", "--verbose", action="store_true")
        sub = ap.add_subparsers(dest="command", required=True)

        def fail(_args):
            raise error

        sub.add_parser("listing").set_defaults(func=fail)
        return ap

    return build


def test_user_errors_print_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    from distill import cli
    from distill.errors import BadInput, IncompatibleRun, Unreachable

    for err in (BadInput("the listing is empty; check the path"), IncompatibleRun("another run; use a new --out"),
                Unreachable("cannot reach redis://x; start redis-server"), FileNotFoundError("no such file: x")):
        monkeypatch.setattr(cli, "build_parser", _parser_raising(err))
        assert cli.main(["listing"]) == 2
        assert capsys.readouterr().err == f"distill listing: error: {err}\n"
    # A plain ValueError (say pyarrow's ArrowInvalid from a file nobody anticipated) is a bug
    # to report, not a user error: it propagates with its traceback.
    monkeypatch.setattr(cli, "build_parser", _parser_raising(ValueError("Parquet magic bytes not found")))
    with pytest.raises(ValueError, match="magic bytes"):
        cli.main(["listing"])


def test_a_full_or_read_only_disk_is_one_line_with_the_fix_and_other_os_errors_are_bugs(monkeypatch, capsys):
    import errno

    from distill import cli
    from distill.errors import storage_fix

    for code, fix in ((errno.ENOSPC, "free space there"), (errno.EDQUOT, "raise the quota"), (errno.EROFS, "read-only")):
        err = OSError(code, os.strerror(code))
        assert fix in storage_fix(err)
        monkeypatch.setattr(cli, "build_parser", _parser_raising(err))
        assert cli.main(["listing"]) == 2
        assert capsys.readouterr().err.startswith(f"distill listing: error: {err}: ")

    class RayTaskErrorLike(RuntimeError):  # the shape of Ray's wrapper: the actor's exception as `cause`
        cause = OSError(errno.ENOSPC, "No space left on device")

    assert "free space there" in storage_fix(RayTaskErrorLike())
    assert storage_fix(OSError(errno.EIO, "I/O error")) is None and storage_fix(ValueError("x")) is None
    monkeypatch.setattr(cli, "build_parser", _parser_raising(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        cli.main(["listing"])


def test_no_decision_reads_an_exception_message():
    """Control flow goes by exception type: no ``in str(e)`` tests in the package."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    hits = [f"{p.relative_to(root)}:{n}" for d in ("distill", "shards", "workers") for p in sorted((root / d).glob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bif\b.*\bin str\(e", line)]
    assert hits == []


def test_version_and_verbose_after_the_verb(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert capsys.readouterr().out.startswith("distill ")
    p = build_parser()
    assert p.parse_args(["status", "x", "-v"]).verbose and p.parse_args(["-v", "status", "x"]).verbose
    assert p.parse_args(["ledger", "show", "x", "-v"]).verbose and not p.parse_args(["status", "x"]).verbose


def test_progress_bars_only_on_a_terminal_unless_asked():
    from distill.startup import show_progress

    assert show_progress(None) is sys.stderr.isatty()  # (under pytest's capture: not a terminal, no bars)
    assert show_progress(True) and not show_progress(False)
    args = build_parser().parse_args(["train", "s", "--out", "o", "--progress"])
    assert args.progress is True and not hasattr(build_parser().parse_args(["train", "s", "--out", "o"]), "progress")
