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

# Order is the order `distill --help` lists them in: the pipeline's order.
STAGES = (
    "distill.listing",
    "distill.embed",
    "distill.status",
    "distill.export_npy",
    "distill.ledger_cli",
    "distill.train",
    "distill.export",
    "distill.evaluate",
    "distill.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill",
        description="Distil a face-recognition teacher (TF SavedModel) into a MobileNet student.",
        epilog="Run `distill demo` to see the whole pipeline on synthetic data, no downloads needed.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in STAGES:
        importlib.import_module(mod).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # TensorFlow's C++ start-up chatter (oneDNN notices, absl preamble) drowns progress bars.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        rc = args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        # User-facing errors carry their fix in the message; no traceback needed.
        print(f"distill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distill {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
