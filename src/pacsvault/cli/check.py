"""``pacsvault check``: what would expose patient data today, and how to fix each point.

Exit code for monitoring (Nagios, a cron mail): 0 clean (notes only), 1 warnings (or a
section that could not run), 2 critical. The run is recorded in the audit trail (one
``check.run`` event) and, when every section ran, kept for Health and the Security check
page (``check.record``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pacsvault.cli.common import add_data_args, open_vault

_LABELS = {
    "en": {"critical": "CRITICAL", "warning": "WARNING", "info": "NOTE", "fix": "Fix:",
           "req": "Requirement:", "error": "could not be checked", "clean": "nothing to report",
           "summary": "{c} critical, {w} warning(s), {i} note(s); exit code {x}",
           "new": "new since the last run"},
    "fr": {"critical": "CRITIQUE", "warning": "ATTENTION", "info": "NOTE",
           "fix": "Correction :", "req": "Exigence :", "error": "n’a pas pu être vérifié",
           "clean": "rien à signaler",
           "summary": "{c} critique(s), {w} avertissement(s), {i} note(s) ; code de sortie {x}",
           "new": "nouveau depuis la dernière exécution"},
}


def register(sub: Any) -> None:
    from pacsvault.check.runner import SECTION_NAMES

    p = sub.add_parser("check", help="security self-check: exposure, accounts, keys and "
                       "disks, backups, audit trail, known-vulnerable versions")
    add_data_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--lang", choices=("en", "fr"), default=None,
                   help="language of the texts (default: from LANG, else English)")
    p.add_argument("--section", action="append", choices=SECTION_NAMES, default=None,
                   help="run only this section (repeatable); the kept result for Health "
                   "is replaced only by a run of every section")
    p.add_argument("--no-probe", action="store_true",
                   help="no active probe (TLS handshakes, gateway questions, collector)")
    p.set_defaults(func=cmd_check)


def _lang(args: argparse.Namespace) -> str:
    if args.lang:
        return str(args.lang)
    env = os.environ.get("LC_ALL") or os.environ.get("LC_MESSAGES") or os.environ.get(
        "LANG", "")
    return "fr" if env.lower().startswith("fr") else "en"


UNKNOWN = 3  # monitoring's "unknown": the check could not run (not "critical", which is 2)


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 clean / 1 warnings / 2 critical / 3 the check could not run (Nagios codes):
    a vault that does not open must not read as an exposure to a monitoring system."""
    from pacsvault.cli.common import USER_ERRORS, CommandError, os_error_message

    try:
        return _check(args)
    except (CommandError, *USER_ERRORS) as exc:
        print(f"pacsvault: error: {exc}", file=sys.stderr)
        return UNKNOWN
    except OSError as exc:
        print(f"pacsvault: error: {os_error_message(exc)}", file=sys.stderr)
        return UNKNOWN


def _check(args: argparse.Namespace) -> int:
    from pacsvault.check.record import counts, run_and_record

    lang = _lang(args)
    vault = open_vault(args)
    try:
        result, new = run_and_record(
            vault, trigger="cli", sections=tuple(args.section) if args.section else None,
            probe=not args.no_probe, user="local-admin")
    finally:
        vault.close()
    if args.json:
        body = result.as_json(lang)
        body["new_critical"] = new
        body["lang"] = lang
        print(json.dumps(body, ensure_ascii=False, indent=2))
        return result.exit_code
    text = _LABELS[lang]
    for f in result.findings:
        mark = f" ({text['new']})" if f.id in new else ""
        print(f"[{text[f.severity.value]}] {f.id}: {f.title.get(lang)}{mark}")
        print(f"    {f.evidence.get(lang)}")
        print(f"    {text['fix']} {f.fix.get(lang)}")
        print(f"    {text['req']} {f.requirement}")
    for section, error in result.errors:
        print(f"[{text['warning']}] {section}: {text['error']} ({error})")
    if not result.findings and not result.errors:
        print(text["clean"])
    n = counts(result)
    print(text["summary"].format(c=n["critical"], w=n["warning"], i=n["info"],
                                 x=result.exit_code))
    return result.exit_code
