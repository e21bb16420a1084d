"""``pacsvault gdpr record``: the record of processing activities (GDPR art. 30), pre-filled
from this archive's live configuration, in French or English, as Markdown or PDF.

Markdown goes to standard output unless ``--out`` is given; a PDF needs ``--out`` (binary
on a terminal helps nobody). The file is written 0600 like every export. Each export is
recorded in the audit trail (``gdpr.record.export``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pacsvault.cli.common import CommandError, add_data_args, open_vault, say
from pacsvault.cli.outputs import write_private

BY = "local-admin"


def register(sub: Any) -> None:
    gdpr = sub.add_parser("gdpr", help="GDPR documents: the record of processing (art. 30)")
    gsub = gdpr.add_subparsers(dest="gdpr_command", required=True, metavar="ACTION")
    p = gsub.add_parser("record", help="this archive's entry in the record of processing "
                        "activities, pre-filled from its configuration (no patient data)")
    add_data_args(p)
    p.add_argument("--lang", choices=("en", "fr"), default="en",
                   help="language of the document (default en)")
    p.add_argument("--format", choices=("md", "pdf"), default="md",
                   help="Markdown (default) or PDF")
    p.add_argument("--out", type=Path, help="write here (0600); Markdown only: default "
                   "standard output")
    p.set_defaults(func=cmd_record)


def cmd_record(args: argparse.Namespace) -> int:
    from pacsvault import gdpr

    if args.format == "pdf" and args.out is None:
        raise CommandError("a PDF needs --out FILE")
    vault = open_vault(args)
    try:
        data = gdpr.export(vault, lang=args.lang, fmt=args.format, by=BY)
    finally:
        vault.close()
    if args.out is None:
        sys.stdout.write(data.decode("utf-8"))
        sys.stdout.flush()
        return 0
    try:
        write_private(args.out, data)
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    say(f"Record of processing written to {args.out} ({args.format}, {args.lang}); the "
        "export is recorded in the audit trail. Fill in the controller's lines before "
        "filing it.")
    return 0
