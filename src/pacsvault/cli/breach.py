"""``pacsvault breach open|update|show|list|export``: the breach register (issue 18).

``open --from-token ID`` (or ``--from-user``, ``--from-node``, ``--from-address``,
``--from-alert SEQ``) with ``--since``/``--until`` counts from the audit trail which
patients, studies and instances the actor touched (``breach.scope``). Nothing printed here
names a patient: ``show`` gives counts; the list of patients only leaves encrypted
(``export --kind patients`` to an age recipient or a passphrase read from a 0600 file or a
prompt, never from argv). Long free text can come from a JSON file (``--fields-file``)
rather than argv, which other users of the machine can read.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
from pathlib import Path
from typing import Any

from pacsvault.breach import documents, patients
from pacsvault.breach import scope as breach_scope
from pacsvault.breach.labels import term
from pacsvault.breach.model import (
    ART34,
    CIRCUMSTANCES,
    DECISIONS,
    DETECTIONS,
    NO_NOTIFY_GROUNDS,
    NOTIFICATION_KINDS,
    ORIGINS,
    SEVERITIES,
    Breach,
    BreachError,
    Notification,
    parse_time,
)
from pacsvault.breach.store import BreachRegister
from pacsvault.cli.common import CommandError, add_data_args, open_vault, say
from pacsvault.cli.outputs import write_private
from pacsvault.fsutil import PrivateFileError, read_private_text
from pacsvault.vault import Vault

BY = "local-admin"
_TEXT = ("title", "controller", "contact", "detection_ref", "circumstances_text", "systems",
         "consequences", "measures_before", "measures_after", "decision_reasons",
         "delay_reasons", "art34_reasons")
_CHOICES = {"detection": DETECTIONS, "origin": ORIGINS, "circumstances": CIRCUMSTANCES,
            "severity": SEVERITIES, "decision": DECISIONS,
            "decision_ground": NO_NOTIFY_GROUNDS, "art34": ART34}
_TIMES = ("aware_at", "started_at", "ended_at", "patients_informed_at")
_LISTS = ("nature", "data_categories", "people_categories")
_FLAGS = ("ongoing", "health_data", "encrypted", "keys_compromised", "people_exact",
          "records_exact")
_COUNTS = {"people": "people_count", "records": "records_count"}


def _record_args(p: argparse.ArgumentParser) -> None:
    for name in _TEXT:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name)
    for name, choices in _CHOICES.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name,
                       choices=[c for c in choices if c] + (["none"] if "" in choices else []))
    for name in _TIMES:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="ISO-TIME")
    for name in _LISTS:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="A,B")
    for name in _FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name,
                       action=argparse.BooleanOptionalAction, default=None)
    for flag, name in _COUNTS.items():
        p.add_argument(f"--{flag}", dest=name, type=int, metavar="N")
    p.add_argument("--fields-file", type=Path,
                   help="JSON object of fields (for free text you do not want on argv)")


def register(sub: Any) -> None:
    breach = sub.add_parser("breach", help="the register of personal data breaches "
                            "(GDPR art. 33): records, scope, 72-hour clock, documents")
    bsub = breach.add_subparsers(dest="breach_command", required=True, metavar="ACTION")

    p = bsub.add_parser("open", help="open a breach record (its scope from the audit trail)")
    add_data_args(p)
    actor = p.add_mutually_exclusive_group()
    actor.add_argument("--from-token", metavar="ID", help="an API token's id")
    actor.add_argument("--from-user", metavar="USER")
    actor.add_argument("--from-node", metavar="AE")
    actor.add_argument("--from-address", metavar="IP")
    actor.add_argument("--from-alert", metavar="SEQ", type=int,
                       help="the trail record number of an alert (pacsvault audit show)")
    p.add_argument("--from-finding", metavar="ID",
                   help="a security self-check finding id (pacsvault check); an exposure "
                   "finding scopes the outside addresses of the window's exposure events")
    p.add_argument("--since", metavar="ISO-TIME")
    p.add_argument("--until", metavar="ISO-TIME", help="default: now")
    _record_args(p)
    p.set_defaults(func=cmd_open)

    p = bsub.add_parser("update", help="change a record (a new version is kept)")
    add_data_args(p)
    p.add_argument("breach_id")
    _record_args(p)
    p.add_argument("--notified", choices=NOTIFICATION_KINDS,
                   help="record a notification sent to the authority")
    p.add_argument("--notified-at", metavar="ISO-TIME", help="default: now")
    p.add_argument("--reference", default="", help="the authority's reference")
    p.add_argument("--rescope", action="store_true",
                   help="count the scope again from the trail (same actor; --since/--until "
                   "change the window): the facts established for a complementary "
                   "notification")
    p.add_argument("--since", metavar="ISO-TIME")
    p.add_argument("--until", metavar="ISO-TIME")
    p.set_defaults(func=cmd_update)

    p = bsub.add_parser("show", help="a record with its 72-hour clock (counts, no names)")
    add_data_args(p)
    p.add_argument("breach_id")
    p.add_argument("--lang", choices=("fr", "en"), default="en")
    p.add_argument("--history", action="store_true", help="every version's dated steps")
    p.set_defaults(func=cmd_show)

    p = bsub.add_parser("list", help="every record with its clock")
    add_data_args(p)
    p.set_defaults(func=cmd_list)

    p = bsub.add_parser("export", help="documents: notification draft, letter to patients, "
                        "register; or the encrypted list of patients")
    add_data_args(p)
    p.add_argument("breach_id", nargs="?", help="omit with --kind register: every record")
    p.add_argument("--kind", choices=(*documents.KINDS, "patients"), default="notification")
    p.add_argument("--format", choices=("pdf", "md"), default="pdf")
    p.add_argument("--lang", choices=("fr", "en"), default="fr")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--recipient", metavar="AGE1...",
                   help="patients: encrypt to this age X25519 recipient (a public key)")
    p.add_argument("--list-passphrase-file", dest="export_passphrase_file", type=Path,
                   help="patients: encrypt to the passphrase in this 0600 file")
    p.add_argument("--list-passphrase-prompt", dest="passphrase_prompt", action="store_true",
                   help="patients: encrypt to a passphrase typed at a prompt")
    p.set_defaults(func=cmd_export)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _apply(record: Breach, values: dict[str, Any]) -> None:
    for name, value in values.items():
        if value is None:
            continue
        if name in _TIMES:
            value = parse_time(str(value)).isoformat(timespec="seconds")
        elif name in _LISTS and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif name in _CHOICES and value == "none":
            value = ""
        setattr(record, name, value)


def _values(args: argparse.Namespace) -> dict[str, Any]:
    names = (*_TEXT, *_CHOICES, *_TIMES, *_LISTS, *_FLAGS, *_COUNTS.values())
    values: dict[str, Any] = {}
    if args.fields_file is not None:
        try:
            loaded = json.loads(args.fields_file.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise CommandError(f"cannot read {args.fields_file}: {exc}") from None
        if not isinstance(loaded, dict) or set(loaded) - set(names):
            raise CommandError(f"{args.fields_file}: a JSON object of fields among: "
                               f"{', '.join(names)}")
        values.update(loaded)
    values.update({n: getattr(args, n) for n in names if getattr(args, n) is not None})
    return values


def _actor(args: argparse.Namespace, vault: Vault) -> tuple[breach_scope.Actor | None,
                                                           dt.datetime | None]:
    for kind, value in (("token", args.from_token), ("user", args.from_user),
                        ("node", args.from_node), ("address", args.from_address)):
        if value:
            return breach_scope.Actor(kind, value), None
    if args.from_alert is not None:
        return breach_scope.alert_actor(vault, args.from_alert)
    return None, None


def cmd_open(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    try:
        now = _now()
        record = Breach(id="", aware_at=now.isoformat(timespec="seconds"))
        actor, alert_time = _actor(args, vault)
        if actor is None and args.from_finding and "exposure" in args.from_finding:
            if not args.since:
                raise CommandError("--since is required (the window's start)")
            actor = breach_scope.exposure_actor(
                vault, parse_time(args.since), parse_time(args.until) if args.until else now)
        if args.from_alert is not None:
            record.detection, record.detection_ref = "alert", str(args.from_alert)
        elif args.from_finding:
            record.detection, record.detection_ref = "self-check", args.from_finding
        if actor is not None:
            until = parse_time(args.until) if args.until else now
            if args.since:
                since = parse_time(args.since)
            elif alert_time is not None:
                since = alert_time - breach_scope.ALERT_LOOKBACK
            else:
                raise CommandError("--since is required with an actor (the window's start)")
            found = breach_scope.compute(vault, actor, since, until, now)
            record.scope = found
            record.started_at = found.since
            record.people_count, record.people_exact = len(found.patients), True
            record.records_count, record.records_exact = found.instances, True
            if found.readable_records:
                record.nature = ["confidentiality"]
        _apply(record, _values(args))
        saved = BreachRegister(vault).open(record, by=BY)
    except (BreachError, PrivateFileError) as exc:
        raise CommandError(str(exc)) from None
    finally:
        vault.close()
    say(f"Breach {saved.id} opened (version 1); {saved.clock(_now()).summary()}.")
    if saved.scope is not None:
        _say_scope(saved)
    print(saved.id)
    return 0


def _say_scope(record: Breach) -> None:
    s = record.scope
    assert s is not None
    say(f"Scope from the trail ({s.actor_kind} {s.actor}, {s.since} -> {s.until}): "
        f"{len(s.patients)} patients, {s.studies} studies, {s.instances} instances; "
        f"{s.readable_patients} patients' data left readable, "
        f"{sum(1 for p in s.patients if p.ciphertext_only)} only as ciphertext; "
        f"{s.records} trail records ({s.queries} queries).")


def cmd_update(args: argparse.Namespace) -> int:
    values = _values(args)
    vault = open_vault(args)
    try:
        def change(record: Breach) -> None:
            _apply(record, values)
            if args.notified:
                sent = parse_time(args.notified_at) if args.notified_at else _now()
                record.notifications.append(Notification(
                    args.notified, sent.isoformat(timespec="seconds"), args.reference))
                if not record.decision:
                    record.decision = "notify"
            if args.rescope:
                _rescope(vault, record, args)
        step = f"notified ({args.notified})" if args.notified else "updated"
        saved = BreachRegister(vault).update(args.breach_id, change, by=BY, step=step)
    except BreachError as exc:
        raise CommandError(str(exc)) from None
    finally:
        vault.close()
    say(f"Breach {saved.id}: version {saved.version}; {saved.clock(_now()).summary()}.")
    return 0


def _rescope(vault: Vault, record: Breach, args: argparse.Namespace) -> None:
    old = record.scope
    if old is None:
        raise BreachError("this record has no scope to count again (open it from an actor)")
    now = _now()
    found = breach_scope.compute(
        vault, breach_scope.Actor(old.actor_kind, old.actor),
        parse_time(args.since) if args.since else parse_time(old.since),
        parse_time(args.until) if args.until else now, now)
    record.scope = found
    record.people_count, record.people_exact = len(found.patients), True
    record.records_count, record.records_exact = found.instances, True


def cmd_show(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    try:
        register_ = BreachRegister(vault)
        record = register_.get(args.breach_id)
        history = register_.history(args.breach_id) if args.history else []
    except BreachError as exc:
        raise CommandError(str(exc)) from None
    finally:
        vault.close()
    lang = args.lang
    print(f"{record.id} v{record.version}  {record.title}")
    print(f"  clock: {record.clock(_now()).summary(lang)}")
    for name in ("aware_at", "started_at", "ended_at", "detection", "origin", "severity",
                 "decision", "decision_ground", "art34"):
        value = getattr(record, name)
        print(f"  {name}: {term(value, lang) if name in _CHOICES else value}")
    print(f"  nature: {', '.join(record.nature) or '-'}")
    print(f"  people: {record.people_count} ({'exact' if record.people_exact else 'est.'})"
          f", records: {record.records_count}")
    for n in record.notifications:
        print(f"  notification {n.kind}: {n.sent_at} {n.reference}")
    if record.scope is not None:
        _say_scope(record)
    for version in history:
        for step in version.steps[-1:]:
            print(f"  v{version.version} {step.time} {step.what} ({step.by})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    try:
        records = BreachRegister(vault).all()
    finally:
        vault.close()
    if not records:
        say("No breach recorded.")
        return 0
    now = _now()
    for r in records:
        print(f"{r.id}  v{r.version:<3} {r.aware_at}  {r.decision or 'undecided':<10}  "
              f"{r.clock(now).summary()}  {r.title}")
    return 0


def _passphrase(args: argparse.Namespace) -> str:
    if args.export_passphrase_file is not None:
        return read_private_text(args.export_passphrase_file, first_line=True)
    if args.passphrase_prompt:
        first = getpass.getpass("Passphrase for the patient list: ")
        if getpass.getpass("Again: ") != first:
            raise CommandError("the two passphrases differ")
        return first
    return ""


def cmd_export(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    try:
        register_ = BreachRegister(vault)
        now = _now()
        if args.kind == "patients":
            if not args.breach_id:
                raise CommandError("which breach? (its id)")
            passphrase = _passphrase(args)
            data = patients.export(vault, register_.get(args.breach_id),
                                   recipient=args.recipient or "", passphrase=passphrase,
                                   by=BY)
        else:
            if args.breach_id:
                record = register_.get(args.breach_id)
            elif args.kind == "register":
                record = Breach(id="BR-00000000-000000")  # every record follows
            else:
                raise CommandError("which breach? (its id)")
            doc = documents.build(args.kind, record, args.lang, now,
                                  register_.all() if args.kind == "register" and
                                  not args.breach_id else None)
            data = doc.to_pdf() if args.format == "pdf" else doc.to_markdown().encode()
        write_private(args.out, data)
        if args.breach_id:
            register_.note_step(args.breach_id, f"exported {args.kind}", by=BY,
                                action="breach.exported")
    except (BreachError, PrivateFileError) as exc:
        raise CommandError(str(exc)) from None
    finally:
        vault.close()
    say(f"Written to {args.out}" + (" (age-encrypted)" if args.kind == "patients" else "")
        + ".")
    return 0
