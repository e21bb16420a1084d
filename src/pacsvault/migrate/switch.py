"""The end of a migration: the settings file pointed at the new backends, the embedded
index file put in (or out of) place, the old backends kept.

The settings file is edited line by line (comments and every other setting stay as the
user wrote them): in ``[index]`` and ``[storage]`` each key the target sets replaces its
uncommented line, or is added under the section header. The result must load as valid
settings before it replaces the file (``fsutil.write_atomic``: the old file or the new
one, never half of one).
"""

from __future__ import annotations

import datetime as dt
import os
import tomllib
from pathlib import Path

from pacsvault import config
from pacsvault.config import IndexSettings, StorageSettings
from pacsvault.fsutil import fsync_dir, write_atomic
from pacsvault.index.db import INDEX_NAME

NEW_INDEX_NAME = "index-migrating.db"
_SIDES = ("", "-wal", "-shm")


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _set(lines: list[str], section: str, values: dict[str, object]) -> list[str]:
    out: list[str] = []
    current = ""
    header_at: int | None = None
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            current = stripped.strip("[]").strip()
            out.append(line)
            if current == section:
                header_at = len(out)
            continue
        if current == section and "=" in stripped and not stripped.startswith("#"):
            name = stripped.split("=", 1)[0].strip()
            if name in values:
                continue  # replaced below, under the header
        out.append(line)
    block = [f"{name} = {_toml(value)}" for name, value in values.items()]
    if header_at is None:
        return [*out, "", f"[{section}]", *block]
    return out[:header_at] + block + out[header_at:]


def settings_text(text: str, index: IndexSettings, storage: StorageSettings) -> str:
    """``text`` (the settings file) naming ``index`` and ``storage``."""
    lines = text.splitlines()
    lines = _set(lines, "index", {"url": index.url, "password_file": index.password_file})
    wanted: dict[str, object] = {"url": storage.url}
    if storage.url:
        wanted.update(endpoint=storage.endpoint, region=storage.region,
                      credentials_file=storage.credentials_file, ca_file=storage.ca_file,
                      path_style=storage.path_style)
    lines = _set(lines, "storage", wanted)
    return "\n".join(lines) + "\n"


def write_settings(data_dir: Path, index: IndexSettings, storage: StorageSettings) -> None:
    path = data_dir / config.CONFIG_NAME
    new = settings_text(path.read_text("utf-8"), index, storage)
    parsed = config.Settings.model_validate(tomllib.loads(new))  # refuse to write a bad file
    if parsed.index != index or parsed.storage.url != storage.url:
        raise RuntimeError("the settings file could not be updated as intended")
    write_atomic(path, new.encode("utf-8"), os.stat(path).st_mode & 0o777)


def set_aside(data_dir: Path, stamp: str) -> Path | None:
    """Move the embedded index (and its WAL) out of the live name; where it went."""
    live = data_dir / INDEX_NAME
    if not live.exists():
        return None
    kept = data_dir / f"{INDEX_NAME}.before-migrate-{stamp}"
    for side in _SIDES:
        source = Path(f"{live}{side}")
        if source.exists():
            os.replace(source, Path(f"{kept}{side}"))
    fsync_dir(data_dir)
    return kept


def put_in_place(data_dir: Path) -> None:
    """The index built by the migration becomes the embedded index."""
    new = data_dir / NEW_INDEX_NAME
    for side in _SIDES:
        source = Path(f"{new}{side}")
        if source.exists():
            os.replace(source, Path(f"{data_dir / INDEX_NAME}{side}"))
    fsync_dir(data_dir)


def remove_new_index(data_dir: Path) -> None:
    for side in _SIDES:
        Path(f"{data_dir / NEW_INDEX_NAME}{side}").unlink(missing_ok=True)


def stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
