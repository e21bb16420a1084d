"""``pacsvault keys status|protect|unprotect|recover`` (``key`` is kept as an alias).

``status`` needs no key at all (it reads the file's header, mode and place), so it answers
even when the key is locked away; ``protect``/``unprotect`` open the vault with the key as
it is held now (a passphrase is asked for if it has one), rewrite the key file atomically
(``crypto.protection``) and record a ``keys.*`` audit event with no secret in it.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path
from typing import Any

from pacsvault import config
from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.cli.common import CommandError, add_data_args, data_dir, say
from pacsvault.crypto import protection
from pacsvault.vault import Layout, Vault, _read_meta, recover, resolve_key_path


def register(sub: Any) -> None:
    key = sub.add_parser("keys", aliases=["key"], help="master key protection and recovery")
    ksub = key.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    p = ksub.add_parser(
        "recover",
        help="restore the key file from the recovery code (read from the terminal or stdin)",
    )
    add_data_args(p)
    p.set_defaults(func=cmd_recover)

    p = ksub.add_parser("status", help="how the master key is held and where it lies")
    add_data_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = ksub.add_parser(
        "protect",
        help="protect the key file with a passphrase (Argon2id) or seal it to this machine "
        "(systemd-creds, TPM2 where present)",
    )
    add_data_args(p, key_file=False)
    p.add_argument("--key-file", type=Path, default=None, help="master key file")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--passphrase", action="store_true",
                     help="a passphrase (asked twice at the terminal, or --passphrase-file)")
    how.add_argument("--machine", action="store_true",
                     help="this machine (systemd-creds): starts unattended, opens nowhere else")
    p.add_argument("--passphrase-file", type=Path, default=None,
                   help="0600 file whose first line is the NEW passphrase (never on argv)")
    p.add_argument("--current-passphrase-file", type=Path, default=None,
                   help="0600 file with the current passphrase, if the key already has one")
    p.set_defaults(func=cmd_protect)

    p = ksub.add_parser("unprotect", help="back to a plain 0600 key file (not recommended)")
    add_data_args(p)
    p.set_defaults(func=cmd_unprotect)

    from pacsvault.cli.rotatecmd import add_rotate  # ``keys rotate`` (its own module)

    add_rotate(ksub)


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


def key_report(root: Path, key_file: Path | None) -> dict[str, Any]:
    """``protection.describe`` for a data dir, without the key (works while locked)."""
    layout = Layout(root)
    settings = config.load(root)
    key_path = resolve_key_path(layout, settings, key_file)
    report = protection.describe(key_path, root)
    report["data"] = str(root)
    report["vault_id"] = str(_read_meta(layout)["vault_id"])
    return report


def cmd_status(args: argparse.Namespace) -> int:
    report = key_report(data_dir(args), args.key_file)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    kinds = {"file": "plain file (mode 0600, no protection)",
             "passphrase": "passphrase (Argon2id + AES-256-GCM)",
             "machine": "sealed to this machine (systemd-creds)",
             "missing": "missing (medium absent?)", "refused": "refused",
             "unknown": "not a pacsvault key file"}
    print(f"Key file     {report['key_file']}")
    print(f"Protection   {kinds.get(report['protection'], report['protection'])}")
    if report["present"]:
        print(f"File         mode {report['mode']}, owner {report['owner']}")
    print(f"Medium       {'present' if report['present'] else 'ABSENT'}")
    where = "SAME as the data" if report["same_filesystem"] else "separate from the data"
    if report["in_data_backup"]:
        where += "; INSIDE the data directory (backed up with it)"
    print(f"Filesystem   {where}")
    if report.get("problem"):
        print(f"Problem      {report['problem']}")
    for warning in report["warnings"]:
        print(f"WARNING: {warning}")
    return 0


def _new_passphrase(args: argparse.Namespace) -> str:
    if args.passphrase_file is not None:
        value = protection.read_passphrase_file(args.passphrase_file)
    elif sys.stdin.isatty():
        value = getpass.getpass("New passphrase of the master key: ")
        if getpass.getpass("Same passphrase again: ") != value:
            raise CommandError("the two passphrases differ; nothing was changed")
    else:
        raise CommandError("no passphrase: run at a terminal or give --passphrase-file FILE "
                           "(mode 0600); never on the command line")
    from pacsvault.accounts.passwords import passphrase_problems  # argon2: only here

    problems = passphrase_problems(value)
    if problems:
        raise CommandError("; ".join(problems) + "; nothing was changed")
    return value


def _record(vault: Vault, action: str, message: str, detail: dict[str, Any]) -> None:
    vault.recorder.emit(AuditEvent(
        action=action, outcome=Outcome.SUCCESS, code=EventCode.SECURITY_ALERT,
        actor_user="local-admin", message=message, detail=detail))


def _open_current(args: argparse.Namespace, current_file: Path | None) -> tuple[Vault, Path]:
    root = data_dir(args)
    vault = Vault.open(root, args.key_file, passphrase=protection.passphrase_provider(
        current_file, prompt="Current passphrase of the master key: "))
    assert vault.key_path is not None
    return vault, vault.key_path.absolute()


def cmd_protect(args: argparse.Namespace) -> int:
    if args.machine:
        support = protection.machine_support()  # refused before any prompt
        if not support.ok:
            raise CommandError(f"machine protection is not available here: {support.reason}; "
                               "nothing was changed (use --passphrase instead)")
    vault, key_path = _open_current(args, args.current_passphrase_file)
    try:
        previous = protection.protection_of(key_path)
        if args.passphrase:
            passphrase = _new_passphrase(args)
            protection.protect_with_passphrase(key_path, vault._master, vault.vault_id,
                                               passphrase)
            kind = protection.PASSPHRASE
        else:
            protection.protect_with_machine(key_path, vault._master, vault.vault_id)
            kind = protection.MACHINE
        _record(vault, "keys.protected",
                f"the master key file is now protected ({kind})",
                {"protection": kind, "previous": previous})
    finally:
        vault.close()
    say(f"Master key {key_path} is now protected ({kind}).")
    if kind == protection.MACHINE:
        say("For the system service add to its unit: "
            f"LoadCredentialEncrypted={protection.CREDENTIAL_NAME}:{key_path}")
    else:
        say("Every start now needs the passphrase (terminal, --passphrase-file, or the "
            f"service credential {protection.PASSPHRASE_CREDENTIAL}).")
    return 0


def cmd_unprotect(args: argparse.Namespace) -> int:
    vault, key_path = _open_current(args, args.passphrase_file)
    try:
        previous = protection.protection_of(key_path)
        protection.unprotect(key_path, vault._master, vault.vault_id)
        _record(vault, "keys.unprotected", "the master key file is now a plain 0600 file",
                {"protection": protection.FILE, "previous": previous})
    finally:
        vault.close()
    say(f"WARNING: the master key {key_path} is now a plain file: whoever reads it opens "
        "the vault. Keep it off the data disk (a USB key) or protect it again.")
    return 0
