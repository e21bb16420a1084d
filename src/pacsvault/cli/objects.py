"""``pacsvault study|series|instance delete`` and ``instance quarantine|unquarantine``.

Admin commands like the others: whoever holds the key file is the local administrator
(``local-admin`` in the trail). A reason is required and recorded (in the encrypted index:
it may name a patient); deleting asks for confirmation unless ``--yes``. They may run while
the server runs: see ``storage.removal`` for why its caches cannot resurrect what is gone.
UIDs are printed on this terminal only (stdout/stderr of the command), never logged.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pacsvault.audit import AuditUnavailable
from pacsvault.cli.common import CommandError, add_data_args, open_vault, say
from pacsvault.cli.listing import print_table, read_vault
from pacsvault.storage.removal import NotFound, Plan, Quarantined, RemovalError, Remover

ACTOR = "local-admin"


def register(sub: Any) -> None:
    for level, what in (("study", "Study Instance UID"), ("series", "Series Instance UID"),
                        ("instance", "SOP Instance UID")):
        article = "an" if level == "instance" else "a"
        group = sub.add_parser(level, help=f"remove a bad {level} (admin)")
        gsub = group.add_subparsers(dest=f"{level}_command", required=True, metavar="ACTION")
        p = gsub.add_parser(
            "delete", help=f"delete {article} {level} for good (audited; crypto-shreds a patient "
            "left without images)")
        add_data_args(p)
        p.add_argument("uid", help=what)
        p.add_argument("--reason", required=True, help="why (recorded, required)")
        p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        p.set_defaults(func=cmd_delete, level=level)
        if level != "instance":
            continue
        for action, text in (("quarantine", "hide an instance from queries and retrieval "
                                            "(kept: export or delete it later)"),
                             ("unquarantine", "make a quarantined instance visible again")):
            p = gsub.add_parser(action, help=text)
            add_data_args(p)
            p.add_argument("uid", help=what)
            p.add_argument("--reason", required=True, help="why (recorded, required)")
            p.set_defaults(func=cmd_quarantine, hide=action == "quarantine")
        p = gsub.add_parser("quarantined", help="list the instances in quarantine")
        add_data_args(p)
        p.set_defaults(func=cmd_list)


def _remover(vault: Any) -> Remover:
    return Remover(vault.engine, vault.store, vault.recorder)


def describe(plan: Plan) -> str:
    lines = [f"{plan.level} {plan.uid}:",
             f"  {plan.instances} instance(s) in {len(plan.series_uids)} series of "
             f"{len(plan.study_uids)} study(ies), {plan.size} bytes"
             + (f", modalities {', '.join(plan.modalities)}" if plan.modalities else ""),]
    if plan.quarantined:
        lines.append(f"  {plan.quarantined} of them in quarantine")
    if plan.keys_destroyed:
        lines.append("  the patient has no other image: their data key is destroyed "
                     "(crypto-shredding, irreversible, backups included)")
    return "\n".join(lines)


def _confirm(plan: Plan) -> bool:
    say(describe(plan))
    if not sys.stdin.isatty():
        # piped confirmation is accepted, but nothing typed means no
        answer = sys.stdin.readline()
    else:
        try:
            answer = input(f"Delete this {plan.level} for good? Type 'delete' to confirm: ")
        except EOFError:
            return False
    return answer.strip().lower() == "delete"


def _failure(exc: RemovalError | AuditUnavailable, done: str) -> CommandError:
    """A refused removal says why; one whose audit record failed says it *was* done (it is
    in the index's removal records), so nobody repeats it, and what to check."""
    if isinstance(exc, RemovalError):
        return CommandError(str(exc))
    return CommandError(f"{done} and is in the index's removal records, but the audit trail "
                        "could not record it: check the disk, then 'pacsvault audit verify'")


def cmd_delete(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    try:
        remover = _remover(vault)
        try:
            plan = remover.plan(args.level, args.uid)
            if not args.yes and not _confirm(plan):
                say("Nothing was deleted.")
                return 1
            done = remover.delete(args.level, args.uid, args.reason, actor=ACTOR,
                                  expected=plan)
        except NotFound as exc:
            raise CommandError(f"{exc}; nothing was deleted") from None
        except (RemovalError, AuditUnavailable) as exc:
            raise _failure(exc, "the deletion was done") from None
    finally:
        vault.close()
    say(f"Deleted {done.plan.instances} instance(s) ({done.files_deleted} file(s) removed); "
        f"removal record {done.action_id}."
        + (" The patient's data key was destroyed." if done.plan.keys_destroyed else ""))
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    try:
        remover = _remover(vault)
        try:
            if args.hide:
                change = remover.quarantine(args.uid, args.reason, actor=ACTOR)
            else:
                change = remover.release(args.uid, args.reason, actor=ACTOR)
        except (RemovalError, AuditUnavailable) as exc:
            raise _failure(exc, "the change was made") from None
    finally:
        vault.close()
    say(("Instance put in quarantine: hidden from queries and retrieval, kept."
         if args.hide else "Instance released from quarantine: visible again.")
        + f" Removal record {change.action_id}.")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    def row(q: Quarantined) -> str:
        since = q.since.isoformat(timespec="seconds")[:19] if q.since else "?"
        return (f"{since:<20} {q.sop_uid}\n{'':<21}study {q.study_uid}\n{'':<21}series "
                f"{q.series_uid} {q.modality}\n{'':<21}{q.actor}: {q.reason}")

    return print_table(read_vault(args, lambda vault: _remover(vault).quarantined()),
                       empty="No instance is in quarantine.",
                       header="since                SOP Instance UID / study / series, reason",
                       row=row)
