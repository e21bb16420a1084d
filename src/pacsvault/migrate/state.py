"""The progress of one migration, in ``DATA/migrate-state.json`` (0600).

Why a file: a migration of twenty years of images takes hours and may be cut short (a
reboot, Ctrl-C, the process killed). The next run reads this file and continues where the
last one stopped instead of copying everything again. It holds only what resuming needs:
phase names, counts, the last copied primary keys and object ids (random hex), a digest of
the target description (so another target is not mixed into this one) and the source's
audit anchor (so a vault that changed in between, a server run on the old backends, is
noticed). Never a patient attribute, a UID, a url or a credential.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pacsvault.fsutil import write_atomic

STATE_NAME = "migrate-state.json"
FORMAT = "pacsvault-migrate/1"


class StateError(Exception):
    """The state file cannot be read (message is user-facing)."""


@dataclass
class TableProgress:
    """One table of the index copy: rows copied so far, the last primary key copied (for
    tables with a single-column key; others are copied whole), and whether it is done."""

    copied: int = 0
    last: int | str | None = None
    done: bool = False


@dataclass
class MigrationState:
    target: str  # SHA-256 of the target description (``Target.fingerprint``)
    anchor_seq: int  # the source trail's anchor when the migration started
    anchor_digest: str
    phase: str = "objects"  # objects -> index -> verify -> switch -> done
    objects_copied: int = 0
    objects_skipped: int = 0  # erased on purpose (key destroyed): nothing to copy
    bytes_copied: int = 0
    last_instance_pk: int = 0  # objects copied for every instance up to this pk
    last_object_id: str = ""
    index_created: bool = False
    tables: dict[str, TableProgress] = field(default_factory=dict)
    verified: int = 0
    last_verified_pk: int = 0

    def table(self, name: str) -> TableProgress:
        return self.tables.setdefault(name, TableProgress())


def path_of(data_dir: Path) -> Path:
    return data_dir / STATE_NAME


def load(data_dir: Path) -> MigrationState | None:
    """The state of an interrupted migration, None when none is in progress."""
    path = path_of(data_dir)
    try:
        raw: Any = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise StateError(f"{path} cannot be read; remove it to start the migration over "
                         "(the target is then filled again from the start)") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise StateError(f"{path} is not a pacsvault migration state; remove it to start "
                         "over")
    body = {k: v for k, v in raw.items() if k != "format"}
    tables = {name: TableProgress(**value) for name, value in body.pop("tables", {}).items()}
    try:
        return MigrationState(**body, tables=tables)
    except TypeError:
        raise StateError(f"{path} is from another pacsvault version; remove it to start "
                         "over") from None


def save(data_dir: Path, state: MigrationState) -> None:
    """Written atomically (0600): a crash leaves the previous state or this one."""
    body = {"format": FORMAT, **asdict(state)}
    write_atomic(path_of(data_dir), json.dumps(body, indent=1, sort_keys=True).encode(),
                 0o600)


def remove(data_dir: Path) -> None:
    path_of(data_dir).unlink(missing_ok=True)
