"""Entry point: parse the command line and dispatch, turning known failures into messages."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pacsvault import __version__

# command -> module of pacsvault.cli that registers it. Only the module a command needs is
# imported (the web stack alone costs most of a second at every CLI call).
COMMANDS = {
    "init": "setup", "status": "setup", "serve": "serve", "node": "nodes", "user": "users",
    "token": "users", "export": "export", "key": "keycmd", "keys": "keycmd", "audit": "audit",
    "tls": "tlscmd", "unseal": "unseal",
    "viewer": "viewer", "study": "objects", "series": "objects", "instance": "objects",
    "patient": "patients",
    "service": "service", "backup": "backup", "storage": "storagecmd", "migrate": "migrate",
    "instances": "instancecmd", "alerts": "alertscmd",
    "gdpr": "gdpr",
    "check": "check",
    "breach": "breach",
    "send": "send",  # issue 20, part 5
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacsvault",
        description="Secure-by-default medical imaging archive (mini-PACS).",
    )
    parser.add_argument("--version", action="version", version=f"pacsvault {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command == "":  # --version alone
        wanted = []
    elif command in COMMANDS:
        wanted = [COMMANDS[command]]
    else:
        wanted = list(dict.fromkeys(COMMANDS.values()))
    for name in wanted:
        importlib.import_module(f"pacsvault.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is None and "--version" in argv:  # answered without any command module
        build_parser("").parse_args(["--version"])
    if command == "serve":  # before the server stack imports pydicom (issue 17)
        from pacsvault import deferred

        deferred.install()
    parser = build_parser(command)
    args = parser.parse_args(argv)
    from pacsvault.cli.common import USER_ERRORS, CommandError

    # Commands other than serve print only problems; serve configures its own logging.
    logging.basicConfig(level=logging.WARNING, format="pacsvault: %(message)s")
    try:
        result: int = args.func(args)
        return result
    except (CommandError, *USER_ERRORS) as exc:
        print(f"pacsvault: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user gave: a message, not a traceback
        from pacsvault.cli.common import os_error_message

        print(f"pacsvault: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
