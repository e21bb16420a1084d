"""The objects of an S3 store in a backup (issue 16): a local mirror of their ciphertext.

Why a mirror and not "the bucket's versioning is the backup": a practice that loses the
bucket (an account closed, a provider gone, a delete with the bucket's own credentials,
which versioning does not survive if the same credentials can purge versions) must still
restore from pacsvault's backup alone. restic 0.14 backs up files (or one stdin stream),
so the objects the backed-up index names are kept, as the same ``pacsvault-obj/1``
ciphertext byte for byte, under ``DATA/.backup-objects/ab/cd/<id>.pvo`` (0700/0600),
and the data snapshot takes that directory instead of ``objects/``.

The mirror stays between runs: objects are immutable, so each run downloads only the
objects indexed since the previous one and deletes those no longer indexed (removed or
erased); restic's parent snapshot then reads only the new files. The cost is local disk
of the bucket's size, said in docs/backups.md and README; nothing in it is readable
without the vault's keys (no more than the bucket itself).
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pacsvault.backup.targets import BackupError

if TYPE_CHECKING:
    from pacsvault.vault import Vault

MIRROR_DIR = ".backup-objects"
_WORKERS = 4


@dataclass(frozen=True)
class Mirrored:
    fetched: int
    missing: int  # indexed at the backup's point in time, gone from the bucket since
    removed: int  # in the mirror, no longer indexed


def mirror_path(root: Path, object_id: str) -> Path:
    return root / object_id[:2] / object_id[2:4] / f"{object_id}.pvo"


def is_s3(vault: Vault) -> bool:
    return vault.store.kind == "s3"


def sync(vault: Vault, object_ids: list[str]) -> Mirrored:
    """Bring ``DATA/.backup-objects`` to exactly ``object_ids`` (the dumped index's)."""
    from pacsvault.storage.objects import StorageUnavailable, check_id

    root = vault.layout.root / MIRROR_DIR
    root.mkdir(mode=0o700, exist_ok=True)
    tmp = root / ".tmp"
    tmp.mkdir(mode=0o700, exist_ok=True)
    for left in tmp.iterdir():  # a run killed mid-download
        left.unlink(missing_ok=True)
    wanted = {check_id(i) for i in object_ids}
    removed = 0
    for path in root.glob("*/*/*.pvo"):
        if path.stem not in wanted:
            path.unlink(missing_ok=True)
            removed += 1
    todo = [i for i in sorted(wanted) if not mirror_path(root, i).exists()]

    def fetch(object_id: str) -> bool:
        try:
            data = vault.store.read(object_id)
        except FileNotFoundError:
            return False
        part = tmp / f"{object_id}.part"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        final = mirror_path(root, object_id)
        final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.replace(part, final)
        return True

    fetched = missing = 0
    try:
        with ThreadPoolExecutor(_WORKERS) as pool:
            for found in pool.map(fetch, todo):
                if found:
                    fetched += 1
                else:
                    missing += 1
    except StorageUnavailable as exc:
        raise BackupError(f"the object store did not answer while its objects were copied "
                          f"for backup ({exc}); nothing was backed up") from None
    with contextlib.suppress(OSError):
        tmp.rmdir()
    return Mirrored(fetched, missing, removed)
