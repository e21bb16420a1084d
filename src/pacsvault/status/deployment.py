"""What the deployment is and what it needs: index, object store, instances (issue 16).

Why: on a scale-out vault the IT provider and the DPO must see, from ``pacsvault status``
and the Health page, where the index and the objects live, whether both answer, how the
connection to each is protected, what the scrubber last found, which instances share the
index and whether each still checkpoints. Nothing here prints a password, a credential
or a query string (it may name key files): the database is ``host:port/db``
(``index.postgres.where``), the bucket ``bucket/prefix`` with its endpoint.

A failing connection is a fact of the report (``reachable`` False, a one-line reason),
never an exception out of it: the report is what one reads when something is down.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from pacsvault.config import IndexSettings, Settings, StorageSettings
    from pacsvault.vault import Vault

STALE_CHECKPOINTS = 3  # intervals without a checkpoint before an instance is "silent"


@dataclass(frozen=True)
class IndexInfo:
    kind: str  # "embedded" or "postgresql"
    where: str  # the index file, or host:port/db
    tls: str  # "" (embedded) or libpq's sslmode ("prefer" when unset)
    weakness: str | None  # the TLS warning (network host without verify-full)
    reachable: bool
    error: str
    revision: str | None
    head: str | None

    @property
    def describe(self) -> str:
        if self.kind == "embedded":
            return f"embedded (SQLCipher, {self.where})"
        return f"PostgreSQL {self.where}, TLS {self.tls}"

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.kind, "where": self.where, "tls": self.tls or None,
                "tls_warning": self.weakness, "reachable": self.reachable,
                "error": self.error or None, "revision": self.revision,
                "head": self.head}


@dataclass(frozen=True)
class ObjectsInfo:
    kind: str  # "local" or "s3"
    where: str  # the objects directory, or bucket/prefix
    endpoint: str  # "" for local files
    tls: str  # "" (local), "verified", "verified (CA file)", "plain HTTP (loopback)"
    reachable: bool | None  # None: not asked
    error: str
    scrub: dict[str, Any]  # the last pass (``storage.scrub_state``), {} when none
    sweep: dict[str, Any]  # the last orphan sweep, {} when none

    @property
    def describe(self) -> str:
        if self.kind == "local":
            return f"local files ({self.where})"
        return f"S3 {self.where} at {self.endpoint} (TLS {self.tls})"

    @property
    def scrub_bad(self) -> bool:
        return bool(self.scrub.get("missing") or self.scrub.get("corrupt"))

    @property
    def sweep_refused(self) -> bool:
        return bool(self.sweep.get("refused"))

    @property
    def scrub_time(self) -> dt.datetime | None:
        return _time(self.scrub.get("time"))

    @property
    def sweep_time(self) -> dt.datetime | None:
        return _time(self.sweep.get("time"))

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.kind, "where": self.where, "endpoint": self.endpoint or None,
                "tls": self.tls or None, "reachable": self.reachable,
                "error": self.error or None, "scrub": self.scrub or None,
                "sweep": self.sweep or None}


@dataclass(frozen=True)
class InstanceInfo:
    name: str
    this: bool
    seq: int  # the anchor's last record
    last_checkpoint: dt.datetime | None
    reason: str  # of the last checkpoint: "start", "periodic", "stop" ("" when none)
    silent: bool  # running (last checkpoint not "stop") and none for > 3 intervals

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "this": self.this, "seq": self.seq,
                "last_checkpoint": (self.last_checkpoint.isoformat(timespec="seconds")
                                    if self.last_checkpoint else None),
                "reason": self.reason or None, "silent": self.silent}


@dataclass(frozen=True)
class Deployment:
    index: IndexInfo
    objects: ObjectsInfo
    instance: str  # this data directory's instance name
    instances: tuple[InstanceInfo, ...]  # empty on an embedded index (one instance)
    checkpoint_seconds: int

    @property
    def scale_out(self) -> bool:
        """``pacsvault backup`` cannot protect it (a PostgreSQL index)."""
        return self.index.kind == "postgresql"

    @property
    def bad(self) -> bool:
        """A red line: the index or the bucket does not answer, or the scrub found loss."""
        return (not self.index.reachable or self.objects.reachable is False
                or self.objects.scrub_bad or self.objects.sweep_refused)

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index.as_dict(), "objects": self.objects.as_dict(),
                "instance": self.instance,
                "instances": [i.as_dict() for i in self.instances],
                "checkpoint_seconds": self.checkpoint_seconds}


def _time(value: object) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(str(value)) if value else None
    except ValueError:
        return None


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(orig).__name__


def index_unopened(settings: IndexSettings, root: Path, error: str) -> IndexInfo:
    """The index as configured, when the vault could not open it (``error``)."""
    return _configured_index(settings, root, reachable=False, error=error)


def _configured_index(settings: IndexSettings, root: Path, *, reachable: bool,
                      error: str = "", revision: str | None = None) -> IndexInfo:
    from pacsvault.index import schema

    head = schema.head()
    if not settings.is_postgres:
        return IndexInfo("embedded", str(root / "index.db"), "", None, reachable, error,
                         revision, head)
    from pacsvault.index import postgres
    from pacsvault.index.db import IndexOpenError

    try:
        url = postgres.engine_url(settings)
    except IndexOpenError as exc:
        return IndexInfo("postgresql", "?", "?", None, False, str(exc), None, head)
    mode = str(url.query.get("sslmode", "prefer"))
    return IndexInfo("postgresql", postgres.where(url), mode, postgres.tls_weakness(url),
                     reachable, error, revision, head)


def index_info(settings: IndexSettings, root: Path, engine: Engine) -> IndexInfo:
    """Ask the open engine: one ``SELECT`` of the revision (a fresh pooled connection, so
    a database gone since the vault opened shows here)."""
    from sqlalchemy.exc import SQLAlchemyError

    from pacsvault.index import schema

    try:
        with engine.connect() as conn:
            revision = schema.current(conn)
    except SQLAlchemyError as exc:
        return _configured_index(settings, root, reachable=False, error=_one_line(exc))
    return _configured_index(settings, root, reachable=True, revision=revision)


def _endpoint(settings: StorageSettings) -> tuple[str, str]:
    if settings.endpoint:
        tls = ("plain HTTP (loopback)" if settings.endpoint.startswith("http://")
               else "verified" + (" (CA file)" if settings.ca_file else ""))
        return settings.endpoint, tls
    return f"AWS {settings.region or '(default region)'}", "verified"


def objects_info(settings: StorageSettings, root: Path, *, probe: bool) -> ObjectsInfo:
    """Where the objects are; with ``probe``, whether the bucket answers (a HEAD of the
    bucket; local files: the directory is there and writable)."""
    from pacsvault.storage import scrub_state

    state = scrub_state.load(root)
    scrub = state.get("scrub") if isinstance(state.get("scrub"), dict) else {}
    sweep = state.get("sweep") if isinstance(state.get("sweep"), dict) else {}
    if not settings.url:
        objects = root / "objects"
        ok = objects.is_dir() if probe else None
        return ObjectsInfo("local", str(objects), "", "", ok,
                           "" if ok is not False else "the objects directory is missing",
                           scrub or {}, sweep or {})
    endpoint, tls = _endpoint(settings)
    where = settings.url.removeprefix("s3://")
    reachable: bool | None = None
    error = ""
    if probe:
        from pacsvault.config import ConfigError
        from pacsvault.storage.backends import open_s3

        try:
            open_s3(settings).create()
            reachable = True
        except (OSError, ConfigError) as exc:
            reachable, error = False, _one_line(exc)
    return ObjectsInfo("s3", where, endpoint, tls, reachable, error, scrub or {},
                       sweep or {})


def _last_checkpoint(engine: Engine, name: str) -> tuple[dt.datetime | None, str]:
    """The instance's newest checkpoint line in the index's copy (walked backwards on the
    (instance, seq) key until the first one: checkpoints come every few minutes)."""
    from sqlalchemy import select

    from pacsvault.index.models import AuditLine

    with engine.connect() as conn:
        line = conn.execute(
            select(AuditLine.line).where(AuditLine.instance == name,
                                         AuditLine.line.like('%"kind":"checkpoint"%'))
            .order_by(AuditLine.seq.desc()).limit(1)).scalar()
    if line is None:
        return None, ""
    try:
        body = json.loads(str(line))
        when = dt.datetime.fromisoformat(str(body["time"]).replace("Z", "+00:00"))
    except (ValueError, KeyError, TypeError):
        return None, ""
    detail = body.get("detail")
    reason = str(detail.get("reason", "")) if isinstance(detail, dict) else ""
    return when, reason


def instances_info(engine: Engine, this: str, interval: int,
                   now: dt.datetime) -> tuple[InstanceInfo, ...]:
    """Every instance anchored in the shared index, with its last checkpoint."""
    from pacsvault.audit.instances import heads

    found: list[InstanceInfo] = []
    for name, head in sorted(heads(engine).items()):
        when, reason = _last_checkpoint(engine, name)
        silent = (when is not None and reason != "stop"
                  and (now - when).total_seconds() > STALE_CHECKPOINTS * interval)
        found.append(InstanceInfo(name, name == this, head.seq, when, reason, silent))
    return tuple(found)


def deployment(vault: Vault, now: dt.datetime, *, probe_objects: bool = True) -> Deployment:
    """The deployment of an open vault; every part that fails is reported, not raised."""
    from sqlalchemy.exc import SQLAlchemyError

    settings: Settings = vault.settings
    root = vault.layout.root
    index = index_info(settings.index, root, vault.engine)
    instances: tuple[InstanceInfo, ...] = ()
    if index.reachable and settings.index.is_postgres:
        try:
            instances = instances_info(vault.engine, vault.audit.instance,
                                       settings.audit.checkpoint_seconds, now)
        except SQLAlchemyError as exc:
            index = _configured_index(settings.index, root, reachable=False,
                                      error=_one_line(exc))
    return Deployment(index=index,
                      objects=objects_info(settings.storage, root, probe=probe_objects),
                      instance=vault.audit.instance, instances=instances,
                      checkpoint_seconds=settings.audit.checkpoint_seconds)


def unopened(settings: Settings, root: Path, instance: str, error: str) -> Deployment:
    """The deployment of a vault whose index could not be opened (``error``)."""
    return Deployment(index=index_unopened(settings.index, root, error),
                      objects=objects_info(settings.storage, root, probe=True),
                      instance=instance, instances=(),
                      checkpoint_seconds=settings.audit.checkpoint_seconds)
