"""``pacsvault storage scrub``: read back and authenticate every indexed object now.

For a vault whose objects are in a bucket (``[storage] url = "s3://..."``) ``serve`` does
the same in the background (``storage.scrub``); this runs a whole pass at once, for local
files too, and with a bucket also the orphan sweep (objects never indexed, older than the
grace). Prints counts and the object ids (random names, never a UID) of what is missing or
corrupt; exits 1 if anything is. Recorded as ``storage.scrub``.
"""

from __future__ import annotations

import argparse
from typing import Any

from pacsvault.cli.common import add_data_args, open_vault, say


def register(sub: Any) -> None:
    group = sub.add_parser("storage", help="the object store: scrub (verify every object)")
    gsub = group.add_subparsers(dest="storage_command", required=True, metavar="ACTION")
    p = gsub.add_parser("scrub", help="read back and authenticate every indexed object; "
                        "with a bucket, also delete objects never indexed (past the grace)")
    add_data_args(p)
    p.add_argument("--per-second", type=float, default=0.0,
                   help="at most this many objects per second (default: no limit)")
    p.set_defaults(func=cmd_scrub)


def cmd_scrub(args: argparse.Namespace) -> int:
    from pacsvault.storage import scrub

    vault = open_vault(args)
    try:
        swept = scrub.sweep(vault)
        report = scrub.scrub(vault, per_second=args.per_second or None)
        scrub.record(vault, report, via="cli")
    finally:
        vault.close()
    print(f"checked: {report.checked} object(s) read and authenticated")
    if report.skipped:
        print(f"skipped: {report.skipped} (data key destroyed: being erased)")
    if swept is not None:
        print(f"orphans removed: {len(swept.removed)} (stored but never indexed, older "
              f"than {int(vault.settings.storage.orphan_grace_seconds)} s)")
        if swept.refused:
            say(f"{swept.refused} unindexed objects, more than orphan_limit: none deleted "
                "(is this the index that goes with this bucket and prefix?)")
    for object_id in report.missing:
        print(f"missing: {object_id}")
    for object_id in report.corrupt:
        print(f"corrupt: {object_id}")
    if not report.ok:
        say(f"{len(report.missing)} missing and {len(report.corrupt)} corrupt object(s): "
            "restore them from a backup")
    return 0 if report.ok and not (swept is not None and swept.refused) else 1
