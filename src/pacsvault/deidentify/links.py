"""The link tables of de-identification projects: pseudonym -> patient ID, encrypted,
inside the vault's index (``deidentify_links``, ``index.deployment_state``; files
``DATA/deidentify/*.links`` before issue 16, imported on first use).

Why the index: several instances share it, each with its own data directory; a pseudonym
made on A must be linked on B, and an erasure on A must remove the patient's lines wherever
they were written. Apart from ``export`` so that a patient's erasure (``storage.erasure``)
reaches them without importing pydicom and the code dictionaries of the de-identification.

A row holds keyed digests (HMAC under the links key) of the project name, the pseudonym and
the patient ID, and the pair itself AES-GCM sealed with the project's digest as associated
data. A dump shows which lines share a project or a patient, never a name, an ID or a
pseudonym. The unique (project, pseudonym) settles two instances adding the same line.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from pacsvault.crypto import keys
from pacsvault.index.deployment_state import LinkRow

if TYPE_CHECKING:
    from pacsvault.vault import Vault

LINKS_DIR = "deidentify"  # the link files' folder before issue 16 (imported on first use)
IMPORTED_NAME = "deidentify.imported"
log = logging.getLogger("pacsvault.deidentify")


def _links_key(vault: Vault, root: bytes | None = None) -> bytes:
    """One key for every project's link table (HKDF, purpose ``link-table``, no project):
    a patient's erasure must reach every table without knowing the project names."""
    if root is None:
        root = vault.named_secret(keys.DEIDENTIFY_SECRET)
    return keys.project_key(root, vault.vault_id, "", keys.PURPOSE_DEIDENTIFY_LINKS)


def _mac(key: bytes, label: bytes, value: bytes) -> bytes:
    return hmac.new(key, label + b"\x00" + value, hashlib.sha256).digest()


def _patient(key: bytes, patient_id: str) -> bytes:
    return _mac(key, b"patient", patient_id.encode())


def _seal(key: bytes, aad: bytes, row: dict[str, str]) -> bytes:
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(key).encrypt(nonce, json.dumps(row).encode(), aad)


def _open(key: bytes, aad: bytes, blob: bytes) -> dict[str, str]:
    row = json.loads(AESGCM(key).decrypt(blob[:12], blob[12:], aad))
    return {str(k): str(v) for k, v in row.items()}


class LinkTable:
    """Pseudonym -> patient ID of one project, kept inside the vault, encrypted (AES-GCM,
    ``_links_key``, bound to the project). It never leaves the vault: the export only
    writes pseudonyms. The project is named by a keyed digest (the name itself is not
    stored); a patient's erasure removes their lines (``forget_patients``)."""

    def __init__(self, vault: Vault, project: str) -> None:
        self._vault = vault
        self._key = _links_key(vault)
        name = hmac.new(self._key, b"file:" + project.encode(), hashlib.sha256).hexdigest()
        self.project = bytes.fromhex(name[:32])
        self._aad = b"link:" + name[:32].encode()
        legacy = vault.layout.root / LINKS_DIR
        if legacy.is_dir():  # (another process of this directory may be importing it)
            with contextlib.suppress(FileNotFoundError):
                import_files(vault, legacy)

    def _pseudonym(self, pseudonym: str) -> bytes:
        return _mac(self._key, b"pseudonym:" + self.project, pseudonym.encode())

    def add(self, links: dict[str, str]) -> None:
        """Keep these lines; a pseudonym already linked to another patient ID is linked to
        the new one (the last export's answer, as the appended file had it)."""
        for pseudonym, patient_id in sorted(links.items()):
            key = self._pseudonym(pseudonym)
            blob = _seal(self._key, self._aad, {"pseudonym": pseudonym, "patient_id": patient_id})
            patient = _patient(self._key, patient_id)
            for attempt in range(3):  # another instance inserting the same line meanwhile:
                try:  # its insert won the unique (project, pseudonym); look again
                    self._put(key, patient, blob)
                    break
                except IntegrityError:
                    if attempt == 2:
                        raise

    def _put(self, key: bytes, patient: bytes, blob: bytes) -> None:
        with self._vault.sessions.begin() as session:
            row = session.scalar(select(LinkRow).where(LinkRow.project == self.project,
                                                       LinkRow.pseudonym == key))
            if row is None:
                session.add(LinkRow(project=self.project, pseudonym=key, patient=patient,
                                    blob=blob))
            elif row.patient != patient:
                row.patient, row.blob = patient, blob

    def read(self) -> dict[str, str]:
        with self._vault.sessions() as session:
            blobs = list(session.scalars(select(LinkRow.blob).where(
                LinkRow.project == self.project).order_by(LinkRow.pk)))
        rows = (_open(self._key, self._aad, blob) for blob in blobs)
        return {row["pseudonym"]: row["patient_id"] for row in rows}


def forget_patients(vault: Vault, patient_ids: set[str]) -> int:
    """Remove these patients' lines from every link table (a patient's erasure), whichever
    instance wrote them; answer how many went. One ``DELETE`` by the patients' digests."""
    if not patient_ids:
        return 0
    key = _links_key(vault)
    legacy = vault.layout.root / LINKS_DIR
    if legacy.is_dir():
        with contextlib.suppress(FileNotFoundError):
            import_files(vault, legacy)
    digests = [_patient(key, pid) for pid in sorted(patient_ids)]
    with vault.sessions.begin() as session:
        result = session.execute(delete(LinkRow).where(LinkRow.patient.in_(digests)))
        return int(getattr(result, "rowcount", 0) or 0)


def import_files(vault: Vault, folder: Path) -> int:
    """Move link tables kept as files (before issue 16) into the index; answer how many
    lines were added. A file's lines open with the deployment's links key, or with this
    directory's own (``vault.json``, if its secret differed) and are sealed again under the
    deployment's. Idempotent; the folder is then renamed ``deidentify.imported``. (A file
    written under a different key is named by that key's project digest: its lines are
    kept and erasable, but no project name of the deployment reaches them.)"""
    key = _links_key(vault)
    local = vault.file_secret(keys.DEIDENTIFY_SECRET)
    candidates = [key] + ([_links_key(vault, local)] if local is not None else [])
    added = 0
    for path in sorted(folder.glob("*.links")):
        aad = b"link:" + path.stem.encode()
        project = bytes.fromhex(path.stem)
        lines = path.read_bytes().splitlines()
        rows: dict[str, str] = {}
        for line in lines:
            row = _open_any(candidates, aad, base64.b64decode(line))
            rows[row["pseudonym"]] = row["patient_id"]  # later lines win, as reading did
        for pseudonym, patient_id in rows.items():
            pseudonym_key = _mac(key, b"pseudonym:" + project, pseudonym.encode())
            row_blob = _seal(key, aad, {"pseudonym": pseudonym, "patient_id": patient_id})
            try:
                with vault.sessions.begin() as session:
                    session.add(LinkRow(project=project, pseudonym=pseudonym_key,
                                        patient=_patient(key, patient_id), blob=row_blob))
                added += 1
            except IntegrityError:
                pass  # already there
    target = folder.with_name(IMPORTED_NAME)
    if target.exists():
        target = folder.with_name(f"{IMPORTED_NAME}-{os.getpid()}-{secrets.token_hex(2)}")
    with contextlib.suppress(FileNotFoundError):  # another process of this directory
        os.replace(folder, target)
    log.info("de-identification link tables: %d line(s) imported into the index", added)
    return added


def _open_any(candidates: list[bytes], aad: bytes, blob: bytes) -> dict[str, str]:
    for n, key in enumerate(candidates):
        try:
            return _open(key, aad, blob)
        except InvalidTag:
            if n == len(candidates) - 1:
                raise
    raise InvalidTag
