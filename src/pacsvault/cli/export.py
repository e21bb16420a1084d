"""``pacsvault export``: decrypt instances back into DICOM files.

The files are plaintext patient data on a PC others may use: 0600, in folders pacsvault
creates as 0700 whatever the umask (``cli.outputs``). The export is recorded (durably)
before the first file is written, so no plaintext ever leaves unrecorded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pacsvault.audit import AuditEvent, AuditUnavailable, EventCode, Outcome
from pacsvault.cli.common import CommandError, add_data_args, open_vault, say
from pacsvault.cli.outputs import (
    DIR_MODE,
    FILE_MODE,
    private_dir,
    restrict_dir,
    write_private,
)
from pacsvault.fsutil import write_durably
from pacsvault.index.records import StoredInstance
from pacsvault.vault import Vault

_SAFE = re.compile(r"^[0-9.]{1,64}$")


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="write decrypted DICOM files (as received) to a folder")
    add_data_args(p)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="destination folder")
    # issue 20: a patient CD / USB key (media/)
    where.add_argument("--media", type=Path, metavar="DIR",
                       help="write a standard DICOM media (DICOMDIR, PS3.11 general purpose "
                            "CD/USB) of --study or --patient into DIR (a USB key, a folder "
                            "to burn); quarantined instances are left out")
    p.add_argument("--lang", choices=("fr", "en"), default="fr",
                   help="with --media: language of INDEX.HTM and README.TXT")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", help="Study Instance UID")
    which.add_argument("--patient", help="Patient ID")
    which.add_argument("--instance", help="SOP Instance UID (also a quarantined one)")
    which.add_argument("--all", action="store_true", help="every instance")
    # issue 19: de-identified export (deidentify/)
    p.add_argument("--deidentify", metavar="PROFILE",
                   help="de-identify (PS3.15 Annex E) with this profile: "
                        "basic, research or teaching")
    p.add_argument("--project", help="export project (with --deidentify): the same patient "
                   "gets the same pseudonym in every export of one project; never a "
                   "patient's name")
    p.add_argument("--accept-burned-in", action="store_true",
                   help="with --deidentify: also export objects that may show identifying "
                        "text in their pixels (not cleaned)")
    p.add_argument("--link-table", action="store_true",
                   help="with --deidentify: keep pseudonym -> patient inside the vault, "
                        "encrypted")
    p.set_defaults(func=cmd_export)


def _component(uid: str) -> str:
    # UIDs are digits and dots; anything else (a hostile value) must not shape a path.
    return uid if _SAFE.match(uid) else "invalid-uid"


# Kernel and device trees: writing patient files there is always a mistake.
_SYSTEM_TREES = (Path("/proc"), Path("/sys"), Path("/dev"))


def check_destination(out: Path, flag: str = "--out") -> None:
    """Refuse, with a one-line reason, a destination that cannot take the files (issue 12,
    defect 6: these were tracebacks), before the vault is opened or anything decrypted."""
    target = Path(os.path.abspath(out))
    for tree in _SYSTEM_TREES:
        if target == tree or tree in target.parents:
            raise CommandError(f"{flag} {out}: {tree} is a system folder, not a place for "
                               "files; choose a folder of your own")
    # os.path answers False where Path.exists raises (a folder we may not look into)
    if os.path.exists(target) and not os.path.isdir(target):
        raise CommandError(f"{flag} {out} is a file, not a folder")
    existing = target
    while not os.path.exists(existing) and existing != existing.parent:
        existing = existing.parent
    if not os.path.isdir(existing):
        raise CommandError(f"{flag} {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"{flag} {out}: no permission to write in {existing}")


def cmd_export(args: argparse.Namespace) -> int:
    deid_only = [f for f, on in (("--project", args.project),
                                 ("--accept-burned-in", args.accept_burned_in),
                                 ("--link-table", args.link_table)) if on]
    if args.deidentify is None and deid_only:
        raise CommandError(f"{deid_only[0]} goes with --deidentify PROFILE")
    if args.media is not None:
        return _export_media(args)
    check_destination(args.out)
    try:
        if args.deidentify is not None:
            return _export_deidentified(args)
        return _export(args)
    except OSError as exc:  # full disk, read-only mount, permissions changed meanwhile
        where = f" {exc.filename}" if exc.filename else ""
        raise CommandError(f"export stopped: cannot write{where}: "
                           f"{exc.strerror or type(exc).__name__}") from None


def _record_before_writing(vault: Vault, items: list[StoredInstance],
                           studies: set[str]) -> None:
    """Make the export's record durable before any plaintext file exists (fail closed):
    if the trail cannot take it, nothing is written and the command exits 2. The record
    names, sealed, everything about to be exported, grouped per patient (the records
    carry their patient: no second query)."""
    owners = {i.study_uid: i.patient_id for i in items}
    try:
        vault.recorder.emit(
            AuditEvent(action="export", outcome=Outcome.SUCCESS, code=EventCode.EXPORT,
                       actor_user="local-admin", study_uids=tuple(sorted(studies)),
                       sop_uids=tuple(i.sop_uid for i in items),
                       patient_ids=tuple(sorted(set(owners.values()))),
                       study_patients=owners,
                       sop_studies={i.sop_uid: i.study_uid for i in items},
                       detail={"instances": len(items), "destination": "local folder"}),
            required=True)
    except AuditUnavailable:
        raise CommandError("export refused: the audit trail cannot record it (disk full "
                           "or unwritable?); no file was written") from None


def _export(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    try:
        items = list(vault.archive.locate(study_uid=args.study, patient_id=args.patient,
                                          sop_uid=args.instance))
        if not items:
            raise CommandError("nothing matches; no file was written")
        studies = {i.study_uid for i in items}
        _record_before_writing(vault, items, studies)
        private_dir(args.out)
        made: set[Path] = set()
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
                bar.update(item.size)
    finally:
        vault.close()
    say(f"Exported {len(items)} instance(s) of {len(studies)} study(ies) to {args.out}.")
    return 0


def _export_deidentified(args: argparse.Namespace) -> int:
    """``--deidentify``: the same selection, written as de-identified files (the
    workflow, ``deidentify.export``, decides, records and de-identifies)."""
    from pacsvault.deidentify import export as deid
    from pacsvault.deidentify.options import profile

    try:
        chosen = profile(args.deidentify)
        project = deid.check_project(args.project or "")
    except (ValueError, deid.DeidentifyError) as exc:
        raise CommandError(f"{exc}{'' if args.project else ' (--project NAME)'}") from None
    if args.accept_burned_in:
        say("WARNING: --accept-burned-in: objects flagged as possibly showing the patient's "
            "name or other text in their pixels (burned-in annotation, ultrasound, secondary "
            "capture) are exported with their pixels unchanged. Check every such image "
            "before sharing it.")
    vault = open_vault(args)
    try:
        items = list(vault.archive.locate(study_uid=args.study, patient_id=args.patient,
                                          sop_uid=args.instance))
        made: set[Path] = set()
        # the export CLI shows a progress bar for every kind (issue 20): one step per file
        bar = tqdm(total=len(items), unit="file", desc="de-identify", file=sys.stderr,
                   disable=None)

        def sink(relative: str, data: bytes) -> None:
            target = args.out / relative
            if not made:
                private_dir(args.out)
                made.add(args.out)
            folder = args.out
            for part in Path(relative).parent.parts:
                folder = folder / part
                if folder not in made:
                    private_dir(folder)
                    restrict_dir(folder)
                    made.add(folder)
            write_private(target, data)
            if relative.endswith(".dcm"):
                bar.update(1)

        request = deid.Request(project=project, profile=chosen,
                               accept_burned_in=args.accept_burned_in,
                               link_table=args.link_table)
        try:
            result = deid.export(vault, items, request, sink)
        except AuditUnavailable:
            raise CommandError("export refused: the audit trail cannot record it (disk full "
                               "or unwritable?); no file was written") from None
        except deid.DeidentifyError as exc:
            raise CommandError(str(exc)) from None
        finally:
            bar.close()
    finally:
        vault.close()
    say(f"Exported {result.instances} de-identified instance(s) of {result.patients} "
        f"patient(s) to {args.out} (profile {chosen.name}, project {project}). "
        "The files are pseudonymised, not anonymous: see README.txt.")
    return 0


def _export_media(args: argparse.Namespace) -> int:
    """``--media DIR``: the study or patient as a DICOM file-set (``media.export``), written
    0600/0700 like every export, the DICOMDIR last (a folder without one is visibly
    unfinished). Refuses a folder that already holds a DICOMDIR: two file-sets would mix."""
    from pacsvault.media import export as media

    if args.study is None and args.patient is None:
        raise CommandError("--media goes with --study UID or --patient ID")
    if args.deidentify is not None:
        raise CommandError("--media writes the patient's identified media; use --out with "
                           "--deidentify for de-identified files")
    check_destination(args.media, "--media")
    if os.path.lexists(args.media / media.DICOMDIR):
        raise CommandError(f"--media {args.media} already holds a DICOMDIR; choose an empty "
                           "folder")
    vault = open_vault(args)
    try:
        items = media.select_items(vault, study_uid=args.study, patient_id=args.patient)
        try:
            job = media.MediaExport(vault, items, media.Request(lang=args.lang))
        except AuditUnavailable:
            raise CommandError("export refused: the audit trail cannot record it (disk full "
                               "or unwritable?); no file was written") from None
        except media.MediaError as exc:
            raise CommandError(str(exc)) from None
        made: set[Path] = set()
        with tqdm(total=job.total, unit="B", unit_scale=True, desc="media",
                  file=sys.stderr, disable=None) as bar:
            try:
                _media_dir(args.media)
                for relative, data in job.files():
                    target = args.media.joinpath(*relative.split("/"))
                    if target.parent not in made:
                        _media_dir(target.parent)
                        made.add(target.parent)
                    _media_file(target, data)
                    if "/" in relative:
                        bar.update(len(data))
            except media.MediaError as exc:
                raise CommandError(f"export stopped: {exc}; the folder is incomplete "
                                   "(no DICOMDIR)") from None
            except OSError as exc:
                where = f" {exc.filename}" if exc.filename else ""
                raise CommandError(f"export stopped: cannot write{where}: "
                                   f"{exc.strerror or type(exc).__name__}") from None
    finally:
        vault.close()
    say(f"Wrote a DICOM media of {len(items)} instance(s), {job.studies} study(ies) of "
        f"{job.patients} patient(s) to {args.media} (open DICOMDIR; INDEX.HTM lists it).")
    return 0


def _media_dir(path: Path) -> None:
    """Create ``path`` and its missing parents 0700, without ``chmod`` afterwards: the
    media is usually a FAT or exFAT USB key, where changing a mode fails (EPERM) and modes
    mean nothing; on a POSIX file system the mode given at creation holds (a umask only
    removes bits)."""
    missing: list[Path] = []
    current = path
    while not os.path.lexists(current) and current != current.parent:
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, DIR_MODE)
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is not a folder")


def _media_file(path: Path, data: bytes) -> None:
    """Write one file of the media, created 0600 (no ``chmod``: see ``_media_dir``),
    durably (fsync) before the next; a file left by an interrupted run is replaced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    try:
        write_durably(fd, [data])
    finally:
        os.close(fd)
