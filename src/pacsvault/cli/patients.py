"""``pacsvault patient erase|confirm|requests|list-expiring|erase-expired``.

Erasure destroys a patient for good (``storage.erasure``): it needs two administrators, or
a recorded solo confirmation. So unlike other admin commands, holding the key file is not
enough to erase: ``--as NAME`` names the administrator at this terminal, who types their
password and authenticator code (never on the command line). One administrator asks
(``erase`` / ``erase-expired``), another confirms (``confirm N --as OTHER``, or the admin
page, Administration > Erasure). A solo practice (``[retention] solo_practice = true``,
a single administrator) erases with ``--solo``, typing the patient ID again.

Patient IDs and names are printed on this terminal only (``list-expiring``), never logged.
It may run while ``serve`` runs: the removal generation makes the server drop its caches.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from pacsvault.audit import AuditUnavailable
from pacsvault.cli.common import CommandError, add_data_args, open_vault, say
from pacsvault.cli.listing import print_table, read_vault

LOCAL = "127.0.0.1"  # where a terminal's sign-in comes from, for throttling and the trail
KEY_HOLDER = "local-admin"


def register(sub: Any) -> None:
    group = sub.add_parser("patient", help="erase a patient for good; retention (admin)")
    gsub = group.add_subparsers(dest="patient_command", required=True, metavar="ACTION")

    p = gsub.add_parser("erase", help="ask for (or, solo, do) a patient's erasure: data keys "
                        "destroyed, rows and files deleted, backups' keystores replaced")
    add_data_args(p)
    p.add_argument("patient_id", metavar="ID", help="Patient ID")
    p.add_argument("--issuer", default="", help="Issuer of Patient ID, if the archive has one")
    p.add_argument("--reason", required=True, help="why (kept in the encrypted index)")
    p.add_argument("--legal-basis", default="retention-ended",
                   help="retention-ended (default), patient-request, wrong-patient, unlawful, "
                   "legal-obligation; during the retention period a basis other than "
                   "retention-ended is required")
    _who(p)
    p.set_defaults(func=cmd_erase)

    p = gsub.add_parser("confirm", help="confirm another administrator's erasure request")
    add_data_args(p)
    p.add_argument("request", type=int, help="request number")
    p.add_argument("--as", dest="as_admin", metavar="ADMIN", required=True,
                   help="the confirming administrator (password and code asked here)")
    p.set_defaults(func=cmd_confirm)

    p = gsub.add_parser("cancel", help="cancel a pending erasure request")
    add_data_args(p)
    p.add_argument("request", type=int, help="request number")
    p.add_argument("--as", dest="as_admin", metavar="ADMIN", required=True,
                   help="the administrator cancelling (password and code asked here)")
    p.set_defaults(func=cmd_cancel)

    p = gsub.add_parser("requests", help="list erasure requests")
    add_data_args(p)
    p.set_defaults(func=cmd_requests)

    p = gsub.add_parser("list-expiring", help="patients whose retention period has ended "
                        "(or ends within DAYS)")
    add_data_args(p)
    p.add_argument("--within", type=int, default=0, metavar="DAYS",
                   help="also those whose retention ends within DAYS days")
    p.set_defaults(func=cmd_list)

    p = gsub.add_parser("erase-expired", help="ask for (or, solo, do) the erasure of every "
                        "patient whose retention period has ended")
    add_data_args(p)
    p.add_argument("--reason", default="retention period over",
                   help="recorded with the erasure (default: retention period over)")
    _who(p)
    p.set_defaults(func=cmd_erase_expired)


def _who(p: argparse.ArgumentParser) -> None:
    p.add_argument("--as", dest="as_admin", metavar="ADMIN", default=None,
                   help="the administrator asking (password and code asked here); another "
                   "administrator confirms")
    p.add_argument("--solo", action="store_true",
                   help="solo practice ([retention] solo_practice = true, one administrator): "
                   "erase now after typing the confirmation again")


def _ask(prompt: str, *, secret: bool) -> str:
    if not sys.stdin.isatty():
        raise CommandError("no terminal: an erasure's confirmation is typed at a terminal")
    try:
        return getpass.getpass(prompt) if secret else input(prompt)
    except EOFError:
        raise CommandError("nothing was typed; nothing was erased") from None


def authenticate(vault: Any, name: str) -> str:
    """The administrator's two factors, typed at this terminal; their name if right."""
    from pacsvault.accounts.service import AuthOutcome

    if not sys.stdin.isatty():
        raise CommandError("--as needs a terminal to type the password and code at")
    password = _ask(f"Password for {name}: ", secret=True)
    first = vault.accounts.authenticate(name, password, LOCAL)
    if first.outcome is not AuthOutcome.NEEDS_SECOND_FACTOR:
        raise CommandError("sign-in refused (wrong name or password, or too many attempts)")
    if not first.totp_enrolled:
        vault.accounts.cancel(first.ticket)
        raise CommandError("this administrator has no authenticator code set up (sign in "
                           "once on the web pages, or confirm there with a passkey)")
    code = _ask("Authenticator code (or a recovery code): ", secret=True)
    done = vault.accounts.verify_second_factor(first.ticket, code.strip(), LOCAL)
    if done.outcome is not AuthOutcome.SUCCESS:
        raise CommandError("sign-in refused (wrong code, or too many attempts)")
    if "admin" not in done.roles:
        raise CommandError(f"{done.user} is not an administrator")
    return str(done.user)


def _eraser(vault: Any) -> Any:
    from pacsvault.storage.erasure import Eraser

    return Eraser(vault)


def _errors(fn: Any) -> Any:
    """Erasure refusals as one error line; a done erasure the trail refused, explained."""
    from pacsvault.storage.removal import RemovalError

    try:
        return fn()
    except RemovalError as exc:
        raise CommandError(str(exc)) from None
    except AuditUnavailable:
        raise CommandError("the audit trail could not record this: nothing more was done "
                           "(an erasure already made is in the index's removal records); "
                           "check the disk, then 'pacsvault audit verify'") from None


def _done(result: Any) -> None:
    say(f"Erased {len(result.erased)} patient(s): {result.instances} instance(s), "
        f"{sum(e.keys_destroyed for e in result.erased)} data key(s) destroyed, "
        f"{sum(e.files_deleted for e in result.erased)} file(s) removed (request "
        f"{result.request}; removal record(s) "
        f"{', '.join(str(e.record) for e in result.erased) or '-'}).")
    if result.skipped:
        say(f"{result.skipped} patient(s) skipped: gone, or their retention period started "
            "again (a new exam) since the request.")
    if result.backups.startswith("failed"):
        say("WARNING: the backups' keystores could not all be replaced: run "
            "'pacsvault backup run' so the destroyed keys leave every repository.")
    elif result.backups not in ("", "ok"):
        say("Note: the backup module did not replace the keystores "
            f"({result.backups}); older backups keep the keys until pruned.")


def _check_who(args: argparse.Namespace) -> None:
    if not args.as_admin and not args.solo:
        raise CommandError("say who asks: --as ADMIN (another administrator then confirms) "
                           "or --solo (a solo practice)")


def cmd_erase(args: argparse.Namespace) -> int:
    _check_who(args)
    vault = open_vault(args)
    try:
        eraser = _eraser(vault)
        target = _errors(lambda: eraser.find(args.patient_id, args.issuer))
        # refusals before anyone types anything
        _errors(lambda: eraser.check_grounds([target], args.legal_basis, args.reason))
        if args.solo:
            _errors(eraser.solo_allowed)
        actor = authenticate(vault, args.as_admin) if args.as_admin else KEY_HOLDER
        say(f"Patient {target.patient_id}: {target.instances} instance(s) in "
            f"{target.studies} study(ies); retention "
            + ("ended " if target.retention_over() else "runs until ")
            + target.retention.ends.isoformat() + ".")
        if args.solo:
            typed = _ask("Erase for good (keys destroyed, backups included)? Type the "
                         "patient ID again: ", secret=False)
            result = _errors(lambda: eraser.erase_solo(
                args.patient_id, args.issuer, args.reason, args.legal_basis, typed,
                actor=actor, address=LOCAL, via="cli"))
            _done(result)
            return 0
        request = _errors(lambda: eraser.request(args.patient_id, args.issuer, args.reason,
                                                 args.legal_basis, actor=actor,
                                                 address=LOCAL))
    finally:
        vault.close()
    say(f"Erasure request {request} recorded. Another administrator confirms it: "
        f"'pacsvault patient confirm {request} --as NAME' or Administration > Erasure. "
        "Nothing is erased until then.")
    return 0


def cmd_confirm(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    try:
        eraser = _eraser(vault)
        actor = authenticate(vault, args.as_admin)
        result = _errors(lambda: eraser.confirm(args.request, actor=actor, address=LOCAL,
                                                via="cli"))
    finally:
        vault.close()
    _done(result)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    try:
        eraser = _eraser(vault)
        actor = authenticate(vault, args.as_admin)
        _errors(lambda: eraser.cancel(args.request, actor=actor, address=LOCAL))
    finally:
        vault.close()
    say(f"Erasure request {args.request} cancelled.")
    return 0


def cmd_requests(args: argparse.Namespace) -> int:
    return print_table(
        read_vault(args, lambda vault: _eraser(vault).requests()),
        empty="No erasure request.",
        header="request  asked (UTC)        by            patients  basis             status",
        row=lambda r: (f"{r.id:<8} {r.created:%Y-%m-%d %H:%M}   {r.requested_by:<13} "
                       f"{r.count:<9} {r.legal_basis:<17} {r.status}"
                       + (f" by {r.decided_by} ({r.mode})" if r.decided_by else "")))


def cmd_list(args: argparse.Namespace) -> int:
    if args.within < 0:
        raise CommandError("--within is a number of days (0 or more)")
    vault = open_vault(args)
    try:
        due = _eraser(vault).expired(args.within)
    finally:
        vault.close()
    if not due:
        say("No patient's retention period has ended"
            + (f" or ends within {args.within} days." if args.within else "."))
        return 0
    print("retention ends  rule   last exam   studies instances  patient ID / issuer / name")
    for p in due:
        last = p.last_exam.isoformat() if p.last_exam else "?"
        print(f"{p.ends.isoformat():<15} {p.rule:<6} {last:<11} {p.studies:<7} "
              f"{p.instances:<10} {p.patient_id}"
              + (f" / {p.issuer}" if p.issuer else "") + f" / {p.name}")
    say(f"{len(due)} patient(s).")
    return 0


def cmd_erase_expired(args: argparse.Namespace) -> int:
    _check_who(args)
    vault = open_vault(args)
    try:
        eraser = _eraser(vault)
        due = eraser.expired()
        if not due:
            say("No patient's retention period has ended; nothing to erase.")
            return 0
        if args.solo:
            _errors(eraser.solo_allowed)
        actor = authenticate(vault, args.as_admin) if args.as_admin else KEY_HOLDER
        say(f"{len(due)} patient(s) past their retention period "
            "('pacsvault patient list-expiring' lists them).")
        if args.solo:
            typed = _ask(f"Erase these {len(due)} patient(s) for good? Type their number "
                         "again: ", secret=False)
            result = _errors(lambda: eraser.erase_expired_solo(
                args.reason, typed, actor=actor, address=LOCAL, via="cli"))
            _done(result)
            return 0
        request = _errors(lambda: eraser.request_expired(args.reason, actor=actor,
                                                         address=LOCAL))
    finally:
        vault.close()
    say(f"Erasure request {request} recorded ({len(due)} patient(s)). Another administrator "
        f"confirms it: 'pacsvault patient confirm {request} --as NAME' or Administration > "
        "Erasure. Nothing is erased until then.")
    return 0
