"""``pacsvault unseal``: unlock a server that started sealed (master key unavailable).

The running server does the work (it holds the listeners, the journals and the lock):
this command only tells it, over the control socket (``service/control``), to load the
master key, optionally with the passphrase (asked at a terminal or read from a 0600
``--passphrase-file``, never from argv), merge what it received while sealed, and resume
normal service. For a missing key medium: put it back, then run this command.
"""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from pacsvault.cli.common import CommandError, add_data_args, data_dir


def register(sub: Any) -> None:
    p = sub.add_parser(
        "unseal", help="unlock a server that started sealed and merge what it received")
    add_data_args(p)
    p.set_defaults(func=cmd_unseal)


def _passphrase(args: argparse.Namespace, root: Any) -> str | None:
    """The passphrase, only when the server's key file needs one (read here only to know
    whether to ask; the server loads the key itself)."""
    from pacsvault import config
    from pacsvault.crypto import keys, protection
    from pacsvault.vault import Layout, resolve_key_path

    try:
        key_path = resolve_key_path(Layout(root), config.load(root), args.key_file)
        kind = protection.protection_of(key_path)
    except (keys.VaultKeyError, OSError):
        kind = ""  # absent or unreadable here: the server says what it finds
    if kind != protection.PASSPHRASE and args.passphrase_file is None:
        return None
    return protection.passphrase_provider(args.passphrase_file)()


def cmd_unseal(args: argparse.Namespace) -> int:
    from pacsvault.service import control

    root = data_dir(args, announce=False)
    passphrase = _passphrase(args, root)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    try:
        result = control.call(root, "unseal", {"passphrase": passphrase or "",
                                               "user": f"cli:{user}"[:64]})
    except control.ControlUnavailable:
        raise CommandError(
            f"no server is running on {root}: start it ('pacsvault serve'); without its "
            "key it starts sealed and waits for this command") from None
    except control.ControlError as exc:
        raise CommandError(str(exc)) from None
    if result.get("already"):
        print("The archive is not sealed: nothing to do.")
        return 0
    print(f"Archive unsealed: {result.get('stored', 0)} object(s) received while sealed are "
        f"now indexed ({result.get('duplicates', 0)} duplicate(s), "
        f"{result.get('conflicts', 0)} conflict(s)); {result.get('events', 0)} event(s) "
        "added to the audit trail. Normal service resumed.")
    return 0
