"""``pacsvault user ...`` and ``pacsvault token ...``: web accounts and API tokens.

Secrets never come from the command line (it ends up in shell history and in ``ps``): a
password is read from a file that only its owner can read (``--password-file``, mode 0600
or stricter) or typed twice at a prompt; generated passwords and tokens are printed once, on
stdout alone, with the explanations on stderr.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import ipaddress
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pacsvault.accounts.models import ROLES
from pacsvault.accounts.service import (
    AccountError,
    Accounts,
    BlockInfo,
    PasswordRejected,
    UserInfo,
    check_name,
)
from pacsvault.cli.common import CommandError, add_data_args, open_vault, say
from pacsvault.cli.listing import print_table, read_vault
from pacsvault.vault import Vault

T = TypeVar("T")

BY = "local-admin"
MAX_PASSWORD_FILE = 4096


def register(sub: Any) -> None:
    user = sub.add_parser("user", help="web accounts: add, list, disable, reset, unlock, "
                          "blocks")
    usub = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")

    # allow_abbrev=False: "--password SECRET" must not pass for "--password-file".
    p = usub.add_parser("add", help="create an account (second factor set up at first "
                        "sign-in)", allow_abbrev=False)
    add_data_args(p)
    p.add_argument("name")
    _role_arg(p, required=True)
    _password_arg(p)
    p.set_defaults(func=cmd_add)

    p = usub.add_parser("list", help="list accounts")
    add_data_args(p)
    p.set_defaults(func=cmd_list)

    p = usub.add_parser("roles", help="replace an account's roles")
    add_data_args(p)
    p.add_argument("name")
    _role_arg(p, required=True)
    p.set_defaults(func=cmd_roles)

    for action, text in (("disable", "stop an account (its sessions and tokens too)"),
                         ("enable", "allow a disabled account again")):
        p = usub.add_parser(action, help=text)
        add_data_args(p)
        p.add_argument("name")
        p.set_defaults(func=cmd_state, action=action)

    p = usub.add_parser("unlock", help="lift the sign-in blocks of a user name (from every "
                        "computer), or with --address those of a computer")
    add_data_args(p)
    p.add_argument("name", nargs="?", help="the user name")
    p.add_argument("--address", help="lift the blocks of this address instead (any name)")
    p.set_defaults(func=cmd_unlock)

    p = usub.add_parser("unblock-address", help="lift the sign-in blocks of an address")
    add_data_args(p)
    p.add_argument("address")
    p.set_defaults(func=cmd_unblock_address)

    p = usub.add_parser("blocks", help="list the active sign-in blocks")
    add_data_args(p)
    p.set_defaults(func=cmd_blocks)

    p = usub.add_parser("reset", help="new password (random, shown once, unless "
                        "--password-file); --second-factor for a lost phone",
                        allow_abbrev=False)
    add_data_args(p)
    p.add_argument("name")
    p.add_argument("--second-factor", action="store_true",
                   help="also remove the TOTP and recovery codes: the user enrols again")
    p.add_argument("--password-file", type=Path,
                   help="read the new password from this file (mode 0600)")
    p.set_defaults(func=cmd_reset)

    token = sub.add_parser("token", help="API tokens for viewers and scripts (DICOMweb)")
    tsub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")

    p = tsub.add_parser("create", help="issue a bearer token (printed once)")
    add_data_args(p)
    p.add_argument("--user", required=True, help="the account the token acts for")
    p.add_argument("--expires", default=None,
                   help="lifetime: 90m, 12h, 30d, 2w (default and limit: [tokens] default_days "
                        "and max_days, 30 and 90 days unless changed)")
    p.add_argument("--label", default="", help="what the token is for (shown in lists)")
    p.add_argument("--from", dest="source_network", default="", metavar="NETWORK",
                   help="only accept the token from this network, e.g. 192.168.1.0/24")
    p.add_argument("--remote", action="store_true",
                   help="also accept it from outside the practice network (needs internet "
                        "mode; refused otherwise)")
    p.set_defaults(func=cmd_token_create)

    p = tsub.add_parser("list", help="list tokens (never their secret)")
    add_data_args(p)
    p.add_argument("--user", help="only this account's tokens")
    p.set_defaults(func=cmd_token_list)

    p = tsub.add_parser("revoke", help="revoke a token by id")
    add_data_args(p)
    p.add_argument("token_id")
    p.set_defaults(func=cmd_token_revoke)


def _role_arg(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--role", dest="roles", action="append", required=required,
                   choices=ROLES, help="physician (reads images), admin (manages users, "
                   "nodes, settings), auditor (reads the audit trail); repeat for several")


def _password_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--password-file", type=Path,
                   help="read the password from this file (mode 0600); default: prompt twice")


def read_password_file(path: Path) -> str:
    """The first line of ``path``, which must be readable by its owner only."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CommandError(f"{path} is not a regular file")
        if info.st_mode & 0o077:
            raise CommandError(
                f"{path} can be read by other users (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"run 'chmod 600 {path}' first")
        data = fh.read(MAX_PASSWORD_FILE + 1)
    if len(data) > MAX_PASSWORD_FILE:
        raise CommandError(f"{path} is too long to be a password file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError(f"{path} is not UTF-8 text") from None
    lines = text.splitlines()
    password = lines[0] if lines else ""
    if not password:
        raise CommandError(f"{path} is empty")
    return password


def _prompt_password(vault: Vault, name: str) -> str:
    if not sys.stdin.isatty():
        raise CommandError("no terminal to type the password at: use --password-file FILE "
                           "(mode 0600)")
    first = getpass.getpass(f"Password for {name}: ")
    verdict = vault.accounts.check_password(first, name)
    if not verdict.ok:
        raise CommandError("password refused: " + "; ".join(verdict.problems))
    if getpass.getpass("Same password again: ") != first:
        raise CommandError("the two passwords differ; nothing was changed")
    return first


def _fail(exc: AccountError) -> CommandError:
    if isinstance(exc, PasswordRejected):
        return CommandError("password refused: " + "; ".join(exc.problems))
    return CommandError(str(exc))


def _on_accounts(args: argparse.Namespace, use: Callable[[Accounts], T]) -> T:
    """``use`` on the vault's accounts, the vault closed after; a refusal is a message."""
    try:
        return read_vault(args, lambda vault: use(vault.accounts))
    except AccountError as exc:
        raise _fail(exc) from None


def cmd_add(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    try:
        name = check_name(args.name)
        if any(u.name == name for u in vault.accounts.list_users()):
            raise CommandError(f"a user named {name!r} already exists")
        password = (read_password_file(args.password_file) if args.password_file
                    else _prompt_password(vault, name))
        info = vault.accounts.add_user(name, args.roles, password, by=BY)
    except AccountError as exc:
        raise _fail(exc) from None
    finally:
        vault.close()
    say(f"User {info.name} created with roles {', '.join(info.roles)}. They set up their "
        "second factor (authenticator app) at their first sign-in.")
    return 0


def _when(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M") if value else "-"


def cmd_list(args: argparse.Namespace) -> int:
    def row(u: UserInfo) -> str:
        status = "disabled" if u.disabled else "blocked" if u.locked else "active"
        factor = "enrolled" if u.totp_enrolled else "pending"
        return (f"{u.name:<24} {','.join(u.roles):<26} {status:<9} {factor:<10} "
                f"{_when(u.last_login)}")

    return print_table(
        read_vault(args, lambda vault: vault.accounts.list_users()),
        empty="No user yet: add one with 'pacsvault user add NAME --role ROLE'.",
        header=f"{'name':<24} {'roles':<26} {'status':<9} {'2nd factor':<10} "
        "last sign-in (UTC)",
        row=row)


def cmd_roles(args: argparse.Namespace) -> int:
    info = _on_accounts(args, lambda accounts: accounts.set_roles(args.name, args.roles, by=BY))
    say(f"User {info.name} now has roles {', '.join(info.roles)}.")
    return 0


def cmd_state(args: argparse.Namespace) -> int:
    if args.action == "disable":
        _on_accounts(args, lambda accounts: accounts.disable(args.name, by=BY))
        done = ("disabled: they cannot sign in, their open sessions end at their next "
                "request and their tokens stop working")
    else:
        _on_accounts(args, lambda accounts: accounts.enable(args.name, by=BY))
        done = "enabled"
    say(f"User {check_name(args.name)} {done}.")
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    if args.address:
        if args.name:
            raise CommandError("give a user name or --address, not both")
        return _unblock_address(args, args.address)
    if not args.name:
        raise CommandError("give the user name to unlock (or --address ADDRESS)")
    lifted = _on_accounts(args, lambda accounts: accounts.unlock(args.name, by=BY))
    name = args.name.strip().lower()
    if lifted:
        say(f"Sign-in blocks of {name} lifted: they can sign in again from anywhere now.")
    else:
        say(f"{name} had no active sign-in block (failure counts cleared). If they still "
            "cannot sign in, see 'pacsvault user blocks': their computer's address may be "
            "blocked for every name ('pacsvault user unblock-address ADDRESS').")
    return 0


def cmd_unblock_address(args: argparse.Namespace) -> int:
    return _unblock_address(args, args.address)


def _unblock_address(args: argparse.Namespace, address: str) -> int:
    try:
        ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
    except ValueError:
        raise CommandError(f"{address!r} is not an IP address (e.g. 192.168.1.20)") from None
    vault = open_vault(args)
    try:
        lifted = vault.accounts.unlock_address(address, by=BY)
    finally:
        vault.close()
    if lifted:
        say(f"Sign-in blocks of address {address} lifted.")
    else:
        say(f"Address {address} had no active sign-in block (failure counts cleared).")
    return 0


def cmd_blocks(args: argparse.Namespace) -> int:
    def row(b: BlockInfo) -> str:
        who = ("(every name)" if b.scope == "address" else b.user or "(not an account)")
        where = "(computers never used)" if b.scope == "new-sources" else b.source
        return f"{b.block_id:<8} {who:<24} {where:<32} {b.failures:>8}  {_when(b.until)}"

    blocks = read_vault(args, lambda vault: vault.accounts.blocks())
    print_table(blocks, empty="No sign-in is blocked.",
                header=f"{'id':<8} {'user name':<24} {'from':<32} {'failures':>8}  until (UTC)",
                row=row)
    if blocks:
        say("Lift with 'pacsvault user unlock NAME' or 'pacsvault user unblock-address "
            "ADDRESS'; blocks also end by themselves at the time shown.")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    password = read_password_file(args.password_file) if args.password_file else None
    new = _on_accounts(args, lambda accounts: accounts.reset(
        args.name, password, second_factor=args.second_factor, by=BY))
    name = check_name(args.name)
    extra = (" They set up a new second factor at their next sign-in."
             if args.second_factor else "")
    if password is None:
        say(f"New password for {name} (shown once; give it to them in person):")
        print(new, flush=True)
    else:
        say(f"Password of {name} changed.")
    if extra:
        say(extra.strip())
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from pacsvault.accounts.tokens import TokenError, parse_expiry

    try:  # a bad duration is a message before anything is opened (issue 12, defect 6)
        lifetime = parse_expiry(args.expires) if args.expires is not None else None
    except TokenError as exc:
        raise CommandError(f"--expires: {exc}") from None
    issued = _on_accounts(args, lambda accounts: accounts.create_token(
        args.user, lifetime, label=args.label, by=BY, source_network=args.source_network,
        remote=args.remote))
    where = (f" from {args.source_network} only" if args.source_network else "")
    where += (", also from outside the practice network while internet mode is on"
              if args.remote else ", from the practice network only")
    say(f"Token {issued.token_id} for {issued.user}, valid until "
        f"{_when(issued.expires)} UTC{where}; it expires sooner if unused for "
        "[tokens] idle_days. Shown once: copy it into the viewer now. It is "
        "accepted on DICOMweb only, with the user's roles.")
    print(issued.token, flush=True)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    tokens, now = _on_accounts(
        args, lambda accounts: (accounts.list_tokens(args.user), accounts.throttle.now()))
    if not tokens:
        say("No token.")
        return 0
    print(f"{'id':<16}  {'user':<20} {'status':<8} {'expires (UTC)':<16}  "
          f"{'last used (UTC)':<16}  {'last address':<15}  {'from':<18}  label")
    for t in tokens:
        where = (t.source_network or "practice") + (" +remote" if t.remote else "")
        print(f"{t.token_id:<16}  {t.user:<20} {t.status(now):<8} {_when(t.expires):<16}  "
              f"{_when(t.last_used):<16}  {t.last_address or '-':<15}  {where:<18}  "
              f"{t.label}")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    try:
        found = vault.accounts.revoke_token(args.token_id, by=BY)
    finally:
        vault.close()
    if not found:
        raise CommandError("no such token (give the id shown by 'pacsvault token list')")
    say("Token revoked: it stops working at once.")
    return 0
