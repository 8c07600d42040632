"""The `mmguard` command. Subcommands import their heavy dependencies only when they run, so
`mmguard --help` and the serving side never import torch, and `mmguard serve` does not even
import the `calibrate` package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

COMMANDS = ("calibrate", "serve", "evaluate", "demo", "keygen", "sign", "verify")
SIGNING = ("keygen", "sign", "verify")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or one with only the subcommand `only` (what `main` uses when the
    command is known, so that serving never imports the calibration package)."""
    parser = argparse.ArgumentParser(
        prog="mmguard",
        description="Runtime backdoor guard for image classifiers (MMAC/MMOM, MMDF, MM-BD).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if only in (None, "calibrate"):
        from calibrate import cli as calibrate_cli

        calibrate_cli.add_parser(sub)
    if only in (None, "serve"):
        from guard import serve_cli

        serve_cli.add_parser(sub)
    if only is None or only in SIGNING:
        from guard import sign_cli

        sign_cli.add_parsers(sub)
    if only in (None, "evaluate"):
        from calibrate import assess

        assess.add_parser(sub)
    if only in (None, "demo"):
        from calibrate import demo

        demo.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = args_list[0] if args_list and args_list[0] in COMMANDS else None
    args = build_parser(command).parse_args(args_list)
    try:
        if args.command == "calibrate":
            from calibrate import cli as calibrate_cli

            return calibrate_cli.run(args)
        if args.command == "serve":
            from guard import serve_cli

            return serve_cli.run(args)
        if args.command in SIGNING:
            from guard import sign_cli

            return sign_cli.run(args)
        if args.command == "evaluate":
            from calibrate import assess

            return assess.run(args)
        if args.command == "demo":
            from calibrate import demo

            return demo.run(args)
    except KeyboardInterrupt:
        print("mmguard: interrupted", file=sys.stderr)
        return 130
    raise AssertionError(f"unhandled command {args.command}")  # argparse guarantees a choice


if __name__ == "__main__":
    sys.exit(main())
