"""The CLI shell: TensorFlow's C++ import chatter is kept off the terminal, user errors print as one
line, bugs keep their traceback."""

import json
import os
import subprocess
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


@pytest.mark.parametrize("argv", [
    ["train", "SHARDS", "--out", "OUT", "--batch-size", "0"],
    ["train", "NOWHERE", "--out", "OUT"],
    ["export", "NOWHERE", "--out", "OUT"],
    ["evaluate", "NOWHERE", "--folders", "SHARDS"],
    ["demo", "--epochs", "0", "--out", "OUT"],
    ["listing", "NOWHERE", "--out", "OUT/l.parquet"],
])
def test_a_bad_option_or_path_is_refused_before_tensorflow_or_ray_is_imported(tmp_path, argv):
    """What makes a refusal take well under a second: nothing heavy is imported for it."""
    argv = [str(tmp_path / a) if a in ("SHARDS", "NOWHERE", "OUT", "OUT/l.parquet") else a for a in argv]
    (tmp_path / "SHARDS").mkdir()
    code = ("import sys, json; from distill.cli import main; rc = main(json.loads(sys.argv[1])); "
            "print(rc, 'tensorflow' in sys.modules, 'ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["2", "False", "False"], r.stderr[-2000:]
    assert "error:" in r.stderr and "Traceback" not in r.stderr


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


def test_an_out_that_cannot_be_made_and_a_ledger_that_cannot_be_reached_leave_nothing_behind(tmp_path):
    from conftest import MOBILEFACENET, ORL

    from distill.cli import main

    (tmp_path / "afile").write_text("in the way")
    listing = tmp_path / "l.parquet"
    assert main(["listing", str(ORL), "--out", str(listing)]) == 0
    code = "import sys, json; from distill.cli import main; sys.exit(main(json.loads(sys.argv[1])))"
    for argv, says in (
        (["listing", str(ORL), "--out", str(tmp_path / "afile" / "l.parquet")], "--out"),
        (["embed", str(listing), "--teacher", str(MOBILEFACENET), "--out", str(tmp_path / "afile" / "shards")], "--out"),
        (["embed", str(listing), "--teacher", str(MOBILEFACENET), "--out", str(tmp_path / "shards"),
          "--ledger", "redis://127.0.0.1:1/0"], "cannot connect to the Redis ledger"),
    ):
        r = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "shards").exists()  # the unreachable ledger was found before anything was written
