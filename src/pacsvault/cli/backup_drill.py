"""``pacsvault backup drill [--target NAME]``: a restore drill now (``backup/drill.py``).

Registered by ``cli/backup.py`` under the ``backup`` command group (one line there); kept
in its own module so the drill's command and its messages live beside the drill's owner.
The server runs the same drill on its own every ``[backup] drill_every_days``; this is for
the administrator who wants the answer today (after changing a target, before an audit).
Exit 0 when every drill succeeded, 1 when one failed (the failure is recorded and shown),
2 for a mistake (unknown target, no target configured).
"""

from __future__ import annotations

import argparse
from typing import Any

from pacsvault.cli.common import CommandError, add_data_args, open_vault


def register(backup_sub: Any) -> None:
    """Add ``drill`` to the ``backup`` sub-command parser (``add_subparsers`` result)."""
    p = backup_sub.add_parser(
        "drill", help="restore the latest snapshot into a temporary copy, verify it, delete it")
    add_data_args(p)
    p.add_argument("--target", help="only this target (default: every configured target)")
    p.set_defaults(func=cmd_drill)


def cmd_drill(args: argparse.Namespace) -> int:
    from pacsvault.backup.drill import DrillError, run_drill

    vault = open_vault(args)
    try:
        names = [t.name for t in vault.settings.backup.targets]
        if not names:
            raise CommandError("no backup target is configured: add a [[backup.targets]] "
                               "entry to pacsvault.toml first")
        if args.target:
            if args.target not in names:
                raise CommandError(f"no backup target named {args.target!r}; configured: "
                                   f"{', '.join(names)}")
            names = [args.target]
        failed = 0
        for name in names:
            try:
                result = run_drill(vault, name)
            except DrillError as exc:
                raise CommandError(str(exc)) from None
            if result.ok:
                print(f"drill {name}: OK, snapshot {result.snapshot}: {result.summary()} "
                      f"({result.seconds:.0f} s)")
            else:
                failed += 1
                print(f"drill {name}: FAILED: {result.error}")
    finally:
        vault.close()
    return 1 if failed else 0
