"""A de-identified export of a set of stored instances: checks, record, files, README.

Shared by ``pacsvault export --deidentify`` (a folder) and the web action (a ZIP), which
hand a ``Sink``. The order is the identified export's (``cli/export.py``): everything that
can refuse does so before the first byte is written (unknown profile, objects that may show
the patient's identity in their pixels without the user's confirmation), then the export is
recorded durably (fail closed), then the files are written. Identified data is only ever
in memory: decrypted from the archive into a buffer, de-identified there, and only the
result reaches the sink.

The output is pseudonymised, not anonymous: whoever holds the vault can link a pseudonym
back (that is the point of consistent pseudonyms), and images may still show identifying
features. The README written with every export says so.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydicom import dcmread

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.crypto import keys
from pacsvault.deidentify.engine import Pseudonyms, burned_in_reason, deidentify
from pacsvault.deidentify.links import LINKS_DIR as LINKS_DIR
from pacsvault.deidentify.links import LinkTable as LinkTable
from pacsvault.deidentify.options import OPTIONS, Profile
from pacsvault.index.records import StoredInstance

if TYPE_CHECKING:
    from pacsvault.vault import Vault

Sink = Callable[[str, bytes], None]  # (relative path, content)
MAX_PROJECT = 64
README_NAME = "README.txt"


class DeidentifyError(Exception):
    """An export that cannot be done (message user-facing, without patient data)."""


class BurnedInRefused(DeidentifyError):
    """Some objects may show the patient's identity in their pixels; nothing was written."""

    def __init__(self, count: int, reasons: list[str]) -> None:
        self.count, self.reasons = count, reasons
        super().__init__(
            f"{count} object(s) may show the patient's name or other identifying text in "
            f"their pixels ({'; '.join(sorted(set(reasons)))}); this export does not clean "
            "pixels. Nothing was written. Confirm explicitly to export them anyway.")


def check_project(name: str) -> str:
    """A project name: 1-64 printable characters. It keys the pseudonyms and is recorded in
    the trail, so it must not be a patient's name; the UI says so."""
    name = name.strip()
    if not name or len(name) > MAX_PROJECT or any(not c.isprintable() for c in name):
        raise DeidentifyError("a project name is 1 to 64 printable characters")
    return name


@dataclass(frozen=True)
class Request:
    project: str
    profile: Profile
    accept_burned_in: bool = False
    link_table: bool = False
    actor_user: str = "local-admin"
    actor_address: str = ""
    destination: str = "local folder"


@dataclass
class Result:
    instances: int = 0
    patients: int = 0
    burned_in: int = 0
    pseudonyms: set[str] = field(default_factory=set)


def project_pseudonyms(vault: Vault, project: str) -> Pseudonyms:
    root = vault.named_secret(keys.DEIDENTIFY_SECRET)
    return Pseudonyms(keys.project_key(root, vault.vault_id, project))


def flagged(vault: Vault, items: Iterable[StoredInstance]) -> list[str]:
    """Why each object of ``items`` may show identifying text in its pixels (one reason
    per flagged object; empty: none is flagged)."""
    reasons = []
    for item in items:
        header = dcmread(io.BytesIO(vault.archive.read(item)), stop_before_pixels=True)
        reason = burned_in_reason(header)
        if reason:
            reasons.append(reason)
    return reasons


def export(vault: Vault, items: list[StoredInstance], request: Request, sink: Sink
           ) -> Result:
    """De-identify ``items`` into ``sink`` (see the module docstring for the order)."""
    if not items:
        raise DeidentifyError("nothing matches; no file was written")
    project = check_project(request.project)
    flagged_reasons = flagged(vault, items)
    if flagged_reasons and not request.accept_burned_in:
        raise BurnedInRefused(len(flagged_reasons), flagged_reasons)
    _record(vault, items, request, project, len(flagged_reasons))
    pseudonyms = project_pseudonyms(vault, project)
    result = Result(burned_in=len(flagged_reasons))
    links: dict[str, str] = {}
    for item in items:
        ds = dcmread(io.BytesIO(vault.archive.read(item)))
        pseudonym = deidentify(ds, request.profile, pseudonyms)
        links[pseudonym] = item.patient_id
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        sink(_path(pseudonym, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                   str(ds.SOPInstanceUID)), out.getvalue())
        result.instances += 1
    result.pseudonyms = set(links)
    result.patients = len(links)
    sink(README_NAME, readme(project, request.profile, result).encode())
    if request.link_table:
        LinkTable(vault, project).add(links)
    return result


def _path(pseudonym: str, study: str, series: str, sop: str) -> str:
    # new UIDs only (2.25.<decimal>): their last digits name the folders
    return f"{pseudonym}/{study[-12:]}/{series[-12:]}/{sop[-20:]}.dcm"


def _record(vault: Vault, items: list[StoredInstance], request: Request, project: str,
            burned_in: int) -> None:
    """The export's record, durable before any file exists. The detail carries the project,
    profile, options and counts, never patient data; the references (sealed by the trail)
    let a patient's access report show the export."""
    owners = {i.study_uid: i.patient_id for i in items}
    vault.recorder.emit(AuditEvent(
        action="export.deidentified", outcome=Outcome.SUCCESS, code=EventCode.EXPORT,
        actor_user=request.actor_user, actor_address=request.actor_address,
        study_uids=tuple(sorted(owners)), patient_ids=tuple(sorted(set(owners.values()))),
        sop_uids=tuple(i.sop_uid for i in items), study_patients=owners,
        sop_studies={i.sop_uid: i.study_uid for i in items},
        detail={"project": project, "profile": request.profile.name,
                "options": ",".join(request.profile.options) or "none",
                "instances": len(items), "patients": len(set(owners.values())),
                "burned_in_accepted": burned_in, "link_table": request.link_table,
                "destination": request.destination}),
        required=True)


def readme(project: str, profile: Profile, result: Result) -> str:
    options = "\n".join(f"  - {OPTIONS[o].meaning} ({OPTIONS[o].code_value})"
                        for o in profile.options) or "  (none)"
    burned = (f"\nWARNING: {result.burned_in} object(s) were flagged as possibly showing "
              "identifying text in their pixels (burned-in annotation, ultrasound, secondary "
              "capture) and were exported on the user's explicit confirmation. Their pixels "
              "were NOT cleaned.\n" if result.burned_in else "")
    return f"""PSEUDONYMISED, NOT ANONYMOUS
============================

These DICOM files were de-identified by pacsvault for the project "{project}".
They are pseudonymised data, not anonymous data (GDPR recital 26): the practice that
exported them can link each pseudonym back to the patient, and images may still show
identifying features (faces in 3D reconstructions, text in pixels, implants). Treat them
as health data: share them only with the intended recipient, for the stated purpose.

Method: DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile
(code 113100), profile "{profile.name}", with these options:
{options}
Private attributes were removed. Names, identifiers, addresses and UIDs were replaced or
removed, in sequences too. Patient Identity Removed (0012,0062) is YES and the method is
recorded in each file (0012,0063 and 0012,0064).
{burned}
Contents: {result.instances} instance(s) of {result.patients} pseudonymised patient(s).
"""
