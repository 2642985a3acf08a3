"""One CLI, one subcommand per stage.

Each stage module owns its subcommand through ``add_cli(subparsers)``, which parses the
arguments into that stage's frozen config and calls its one entry point. Stage modules keep
TensorFlow and Ray imports inside functions, so building this parser (and ``--help``)
imports neither.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from distill import __version__
from distill.errors import DistillError, Stopped, storage_fix

# Order is the order `distill --help` lists them in: the pipeline's order.
STAGES = (
    "distill.embed.align",
    "distill.embed.listing",
    "distill.embed.run",
    "distill.embed.status",
    "distill.embed.export_npy",
    "distill.embed.ledger_cli",
    "distill.train.run",
    "distill.evaluate.export",
    "distill.evaluate.run",
    "distill.demo",
)

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill",
        description="Distil a face-recognition teacher (a TensorFlow SavedModel) into a small MobileFaceNet (or "
                    "MobileNetV2) student, exported as a SavedModel, TFLite or ONNX.",
        epilog="Run `distill demo` to see the whole pipeline on synthetic data, no downloads needed.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"distill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in STAGES:
        importlib.import_module(mod).add_cli(sub)
    _verbose_after_the_verb(parser)
    return parser


def _verbose_after_the_verb(parser: argparse.ArgumentParser) -> None:
    """``distill embed -v ...`` as well as ``distill -v embed ...``, for every verb (and ``ledger``'s)."""
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for verb in action.choices.values():
            verb.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
            _verbose_after_the_verb(verb)


def main(argv: list[str] | None = None) -> int:
    # TensorFlow's C++ start-up chatter (oneDNN notices, absl preamble) drowns progress bars.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # TensorFlow's own INFO lines ("Assets written to ...") are not ours to show
        for name in ("tensorflow", "absl"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        rc = args.func(args)
    except Stopped as e:  # saved and resumable: the signal's exit status, and how to go on
        print(f"distill {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except (DistillError, FileNotFoundError, PermissionError) as e:
        # User-facing errors carry their fix in the message (a missing or unwritable path names
        # the path); no traceback needed. Anything else is a bug and keeps its traceback.
        print(f"distill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        fix = storage_fix(e)  # a full or read-only disk: the user's to fix, in one line
        if fix is None:
            raise
        print(f"distill {args.command}: error: {e}: {fix}; nothing half-written is kept", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distill {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
