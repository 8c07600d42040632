"""The `mmguard` command. Subcommands import their heavy dependencies only when they run, so
`mmguard --help` and the serving side never import torch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from calibrate import cli as calibrate_cli

    parser = argparse.ArgumentParser(
        prog="mmguard",
        description="Runtime backdoor guard for image classifiers (MMAC/MMOM, MMDF, MM-BD).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    calibrate_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "calibrate":
            from calibrate import cli as calibrate_cli

            return calibrate_cli.run(args)
    except KeyboardInterrupt:
        print("mmguard: interrupted", file=sys.stderr)
        return 130
    raise AssertionError(f"unhandled command {args.command}")  # argparse guarantees a choice


if __name__ == "__main__":
    sys.exit(main())
