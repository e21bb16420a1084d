"""``pacsvault export``: decrypt instances back into DICOM files.

The files are plaintext patient data on a PC others may use: 0600, in folders pacsvault
creates as 0700 whatever the umask (``cli.outputs``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.cli.common import CommandError, add_data_args, open_vault, say
from pacsvault.cli.outputs import private_dir, restrict_dir, write_private

_SAFE = re.compile(r"^[0-9.]{1,64}$")


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="write decrypted DICOM files (as received) to a folder")
    add_data_args(p)
    p.add_argument("--out", type=Path, required=True, help="destination folder")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", help="Study Instance UID")
    which.add_argument("--patient", help="Patient ID")
    which.add_argument("--instance", help="SOP Instance UID (also a quarantined one)")
    which.add_argument("--all", action="store_true", help="every instance")
    p.set_defaults(func=cmd_export)


def _component(uid: str) -> str:
    # UIDs are digits and dots; anything else (a hostile value) must not shape a path.
    return uid if _SAFE.match(uid) else "invalid-uid"


def cmd_export(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    try:
        items = list(vault.archive.locate(study_uid=args.study, patient_id=args.patient,
                                          sop_uid=args.instance))
        if not items:
            raise CommandError("nothing matches; no file was written")
        private_dir(args.out)
        made: set[Path] = set()
        studies: set[str] = set()
        with tqdm(total=sum(i.size for i in items), unit="B", unit_scale=True,
                  desc="export", file=sys.stderr, disable=None) as bar:
            for item in items:
                target = (args.out / _component(item.study_uid) / _component(item.series_uid)
                          / f"{_component(item.sop_uid)}.dcm")
                for folder in (target.parent.parent, target.parent):
                    if folder not in made:  # ours (named by UIDs), even from an older run
                        private_dir(folder)
                        restrict_dir(folder)
                        made.add(folder)
                write_private(target, vault.archive.read(item))
                studies.add(item.study_uid)
                bar.update(item.size)
        vault.recorder.emit(
            AuditEvent(action="export", outcome=Outcome.SUCCESS, code=EventCode.EXPORT,
                       actor_user="local-admin", study_uids=tuple(sorted(studies)),
                       detail={"instances": len(items), "destination": "local folder"})
        )
    finally:
        vault.close()
    say(f"Exported {len(items)} instance(s) of {len(studies)} study(ies) to {args.out}.")
    return 0
