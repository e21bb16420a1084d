"""The link tables of de-identification projects: pseudonym -> patient ID, encrypted,
inside the vault (``DATA/deidentify/*.links``).

Apart from ``export`` so that a patient's erasure (``storage.erasure``) reaches them
without importing pydicom and the code dictionaries of the de-identification itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pacsvault.crypto import keys

if TYPE_CHECKING:
    from pacsvault.vault import Vault

LINKS_DIR = "deidentify"


def _links_key(vault: Vault) -> bytes:
    """One key for every project's link table (HKDF, purpose ``link-table``, no project):
    a patient's erasure must reach every table without knowing the project names."""
    root = vault.named_secret(keys.DEIDENTIFY_SECRET)
    return keys.project_key(root, vault.vault_id, "", keys.PURPOSE_DEIDENTIFY_LINKS)


def _seal(key: bytes, aad: bytes, row: dict[str, str]) -> bytes:
    nonce = secrets.token_bytes(12)
    return base64.b64encode(nonce + AESGCM(key).encrypt(nonce, json.dumps(row).encode(), aad))


def _open(key: bytes, aad: bytes, line: bytes) -> dict[str, str]:
    blob = base64.b64decode(line)
    row = json.loads(AESGCM(key).decrypt(blob[:12], blob[12:], aad))
    return {str(k): str(v) for k, v in row.items()}


class LinkTable:
    """Pseudonym -> patient ID of one project, kept inside the vault, encrypted (AES-GCM,
    ``_links_key``, bound to the file). It never leaves the vault: the export only writes
    pseudonyms. One file per project, named by a keyed digest of the project name (the name
    itself is not on disk); a patient's erasure removes their lines (``forget_patients``)."""

    def __init__(self, vault: Vault, project: str) -> None:
        self._key = _links_key(vault)
        name = hmac.new(self._key, b"file:" + project.encode(), hashlib.sha256).hexdigest()
        self.path: Path = vault.layout.root / LINKS_DIR / f"{name[:32]}.links"
        self._aad = b"link:" + self.path.stem.encode()

    def add(self, links: dict[str, str]) -> None:
        known = self.read()
        fresh = {p: pid for p, pid in links.items() if known.get(p) != pid}
        if not fresh:
            return
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        lines = [_seal(self._key, self._aad, {"pseudonym": p, "patient_id": pid}) + b"\n"
                 for p, pid in sorted(fresh.items())]
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, b"".join(lines))
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> dict[str, str]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        rows = (_open(self._key, self._aad, line) for line in raw.splitlines())
        return {row["pseudonym"]: row["patient_id"] for row in rows}


def forget_patients(vault: Vault, patient_ids: set[str]) -> int:
    """Remove these patients' lines from every link table (a patient's erasure); answer
    how many went. Each table changed is rewritten whole (a new 0600 file, fsync'ed, then
    renamed over the old one: never half a table)."""
    folder = vault.layout.root / LINKS_DIR
    if not patient_ids or not folder.is_dir():
        return 0
    key, removed = _links_key(vault), 0
    for path in sorted(folder.glob("*.links")):
        aad = b"link:" + path.stem.encode()
        lines = path.read_bytes().splitlines()
        keep = [line for line in lines if _open(key, aad, line)["patient_id"] not in patient_ids]
        if len(keep) == len(lines):
            continue
        removed += len(lines) - len(keep)
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"".join(line + b"\n" for line in keep))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    return removed
