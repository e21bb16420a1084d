"""Entry point: parse the command line and dispatch, turning known failures into messages."""

from __future__ import annotations

import argparse
import logging
import sys

from pacsvault import __version__
from pacsvault.cli import audit, export, keycmd, nodes, serve, setup, users
from pacsvault.cli.common import USER_ERRORS, CommandError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacsvault",
        description="Secure-by-default medical imaging archive (mini-PACS).",
    )
    parser.add_argument("--version", action="version", version=f"pacsvault {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (setup, serve, nodes, users, export, keycmd, audit):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Commands other than serve print only problems; serve configures its own logging.
    logging.basicConfig(level=logging.WARNING, format="pacsvault: %(message)s")
    try:
        result: int = args.func(args)
        return result
    except (CommandError, *USER_ERRORS) as exc:
        print(f"pacsvault: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
