"""``pacsvault send --to NODE --study UID [--series UID]``: C-STORE to a registered node.

The rules are ``dicom/send``'s (registered node with the retrieve role and a port, TLS
when the node has it, as stored or losslessly converted, audited before anything leaves).
The command shows a progress bar on a terminal, prints one line per instance that did not
go through (its position in the transfer, never a UID) and a summary; the exit code is 1
when any instance failed, so a script can tell.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tqdm import tqdm

from pacsvault.cli.common import CommandError, add_data_args, open_vault, say


def register(sub: Any) -> None:
    p = sub.add_parser("send", help="send a study or series to a registered DICOM node "
                                    "(C-STORE; the node needs the retrieve role)")
    add_data_args(p)
    p.add_argument("--to", required=True, metavar="NODE", help="AE title of the node")
    p.add_argument("--study", required=True, help="Study Instance UID")
    p.add_argument("--series", help="only this Series Instance UID of the study")
    p.set_defaults(func=cmd_send)


def cmd_send(args: argparse.Namespace) -> int:
    from pacsvault.dicom import send

    vault = open_vault(args)
    try:
        items = send.select(vault, args.study, args.series)
        if not items:
            raise CommandError("no stored instance matches this study"
                               + (" and series" if args.series else ""))
        problems: list[send.InstanceResult] = []
        with tqdm(total=len(items), unit="img", desc=f"send to {args.to}",
                  file=sys.stderr, disable=None) as bar:
            def progress(entry: send.InstanceResult) -> None:
                bar.update(1)
                if entry.outcome != send.SENT:
                    problems.append(entry)

            try:
                result = send.send(vault, args.to, items, origin="cli", progress=progress)
            except send.SendRefused as exc:
                raise CommandError(str(exc)) from None
    finally:
        vault.close()
    for entry in problems:
        if entry.reason in ("not reached", result.note):  # the note below says it once
            continue
        status = f" (status {entry.status:04X})" if entry.status is not None else ""
        say(f"instance {entry.position}/{result.requested}: {entry.outcome}{status}"
            + (f": {entry.reason}" if entry.reason else ""))
    if result.note:
        say(f"pacsvault: {result.note}")
    converted = f", {result.converted} converted" if result.converted else ""
    print(f"sent {result.sent}, warnings {result.warning}, failed {result.failed} "
          f"of {result.requested} to {result.node}{converted}")
    return 0 if result.ok else 1
