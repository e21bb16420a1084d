"""``pacsvault keys rotate``: a new master key, online when ``serve`` runs.

With a running server the rotation happens inside it (``service.control``: it holds the
keys, the index connections and the group-commit lock), so storing continues; without one
the command takes the vault's lock (no server can start meanwhile) and does it here. The
new recovery code goes to a 0600 file beside the key file, and to stdout only when it is a
terminal (as ``init`` does).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pacsvault.cli.common import (
    CommandError,
    add_data_args,
    data_dir,
    passphrase_source,
    say,
)


def add_rotate(ksub: Any) -> None:
    p = ksub.add_parser(
        "rotate",
        help="replace the master key: data keys re-wrapped, index re-keyed, derived keys "
        "and the recovery code renewed (online if the server runs)",
    )
    add_data_args(p)
    p.add_argument("--keep-old-key", action="store_true",
                   help="keep the old key file as <key>.retired-<time> (default: removed; "
                   "it no longer opens the live vault either way)")
    p.set_defaults(func=cmd_rotate)


def _passphrase(args: argparse.Namespace, key_path: Path) -> str | None:
    """The current passphrase, only for a passphrase-protected key (the new key file is
    protected the same way)."""
    from pacsvault.crypto import protection

    try:
        kind = protection.protection_of(key_path)
    except (OSError, ValueError):
        return None
    if kind != protection.PASSPHRASE:
        return None
    return passphrase_source(args)()


def cmd_rotate(args: argparse.Namespace) -> int:
    from pacsvault import config
    from pacsvault.crypto import rotation
    from pacsvault.service import lock as instance_lock
    from pacsvault.service.control import ControlError, ControlUnavailable, call
    from pacsvault.vault import Layout, Vault, resolve_key_path

    root = data_dir(args)
    layout = Layout(root)
    key_path = resolve_key_path(layout, config.load(root), args.key_file)
    passphrase = _passphrase(args, key_path)
    request: dict[str, Any] = {"keep_old": bool(args.keep_old_key), "actor": "local-admin"}
    if passphrase is not None:
        request["passphrase"] = passphrase
    try:
        result = call(root, "rotate", request, timeout=3600)
        code, online = str(result["recovery_code"]), True
        retired = str(result.get("retired_key_file") or "")
        # the server could not write beside the key: this user does
        where = Path(result["code_file"]) if result.get("code_file") else \
            rotation.hand_over_code(key_path, root, code)
    except ControlUnavailable:
        try:
            held = instance_lock.acquire(root)
        except instance_lock.AlreadyRunning as exc:
            raise CommandError(f"{exc}; its control socket does not answer, so the "
                               "rotation cannot run inside it: stop it and retry") from None
        try:
            vault = Vault.open(root, args.key_file, passphrase=passphrase_source(args)
                               if passphrase is None else (lambda: passphrase))
            try:
                out = rotation.rotate(vault, keep_old=bool(args.keep_old_key),
                                      passphrase=passphrase)
                assert vault.key_path is not None
                where = rotation.hand_over_code(vault.key_path, root, out.recovery_code)
            finally:
                vault.close()
        finally:
            held.release()
        code, online, retired = out.recovery_code, False, out.retired_key_file
    except ControlError as exc:
        raise CommandError(f"the server refused the rotation: {exc}") from None
    say(f"Master key rotated {'online (the server kept running)' if online else 'offline'}; "
        f"key file {key_path} replaced" + (f", old one kept as {retired}" if retired else
                                            ", the old one removed") + ".")
    say("Backups taken before now restore with the OLD recovery code; keep it with them.")
    if sys.stdout.isatty():
        say("NEW RECOVERY CODE (write it down and keep it away from this server):")
        print(code, flush=True)
    say("The new recovery code was written to (delete it once on paper):")
    print(where, flush=True)
    return 0
