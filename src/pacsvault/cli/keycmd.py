"""``pacsvault key recover``: rebuild a lost key file from the recovery code."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.cli.common import CommandError, add_data_args, data_dir, say
from pacsvault.vault import Vault, recover


def register(sub: Any) -> None:
    key = sub.add_parser("key", help="master key management")
    ksub = key.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    p = ksub.add_parser(
        "recover",
        help="restore the key file from the recovery code (read from the terminal or stdin)",
    )
    add_data_args(p)
    p.set_defaults(func=cmd_recover)


def cmd_recover(args: argparse.Namespace) -> int:
    # Never from the command line: arguments are visible to every user in the process list.
    code = getpass.getpass("Recovery code: ") if sys.stdin.isatty() else sys.stdin.readline()
    if not code.strip():
        raise CommandError("no recovery code given")
    path = recover(data_dir(args), code, args.key_file)
    vault = Vault.open(data_dir(args), path)
    try:
        vault.recorder.emit(AuditEvent(
            action="key.recover", outcome=Outcome.SUCCESS, code=EventCode.SECURITY_ALERT,
            actor_user="local-admin",
            message="the master key file was rebuilt from the recovery code",
        ))
    finally:
        vault.close()
    say(f"Master key restored to {path} (mode 0600).")
    return 0
