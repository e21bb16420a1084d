"""The node registry: which DICOM peers exist, where they are, and what they may do,
and the certificates issued to them (serials, revocations)."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, cast

from sqlalchemy import Engine, Table, bindparam, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pacsvault.index import hosts
from pacsvault.index.models import Node, NodeCertificate, utcnow
from pacsvault.index.rawselect import RawSelect

ROLES = ("store", "query", "retrieve")
DEFAULT_ROLES = ("store",)
# DICOM TLS profiles a node may use (PS3.15 Annex B): BCP 195 for everyone, the retired
# AES profile only for a node opted in by name (see crypto/tls.py LEGACY_AES_CIPHERS).
TLS_PROFILE_STRICT = "bcp195"
TLS_PROFILE_LEGACY = "legacy-aes"
TLS_PROFILES = (TLS_PROFILE_STRICT, TLS_PROFILE_LEGACY)


class NodeError(Exception):
    """Bad node definition or unknown node (message is user-facing)."""


# What ``certificate_status`` answers for a presented client certificate.
CERT_VALID = "valid"
CERT_REVOKED = "revoked"
CERT_UNKNOWN = "unknown"  # never issued to this node as a client certificate


class Issued(Protocol):
    """A certificate just issued (``crypto.tls.IssuedCert``)."""

    @property
    def kind(self) -> str: ...
    @property
    def serial(self) -> int: ...
    @property
    def not_after(self) -> dt.datetime: ...


def ensure_tables(engine: Engine) -> None:
    """Create ``node_certificates`` and the ``nodes.tls_profile`` column in a vault made
    before they existed (no migrations)."""
    table = cast(Table, NodeCertificate.__table__)
    with contextlib.suppress(OperationalError):  # made by another process meanwhile
        table.create(engine, checkfirst=True)
    with engine.begin() as conn:
        columns = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(nodes)")}
        if columns and "tls_profile" not in columns:
            with contextlib.suppress(OperationalError):  # "duplicate column": raced
                conn.exec_driver_sql("ALTER TABLE nodes ADD COLUMN tls_profile "
                                     "VARCHAR(16) NOT NULL DEFAULT 'bcp195'")


def _as_utc(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class NodeInfo:
    ae_title: str
    host: str
    port: int | None
    tls: bool
    client_cert: bool
    roles: tuple[str, ...]
    tls_profile: str = TLS_PROFILE_STRICT

    def may(self, role: str) -> bool:
        return role in self.roles

    @property
    def legacy_tls(self) -> bool:
        """Opted in to the retired AES TLS profile (a finding on the Health page)."""
        return self.tls_profile == TLS_PROFILE_LEGACY


def parse_roles(text: str) -> tuple[str, ...]:
    roles = tuple(dict.fromkeys(r.strip() for r in text.split(",") if r.strip()))
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise NodeError(f"roles must be among {', '.join(ROLES)}")
    return roles


def check_ae_title(ae: str) -> str:
    """PS3.5 AE title rules (``hosts.check_ae_title``), as a ``NodeError``."""
    try:
        return hosts.check_ae_title(ae)
    except hosts.HostError as exc:
        raise NodeError(str(exc)) from None


def check_host(host: str, *, tls: bool) -> str:
    """Strict host rules (``hosts.check_host``: one device, plain DICOM only on the
    practice network), as a ``NodeError``."""
    try:
        return hosts.check_host(host, tls=tls)
    except hosts.HostError as exc:
        raise NodeError(str(exc)) from None


def check_tls_profile(profile: str) -> str:
    if profile not in TLS_PROFILES:
        raise NodeError(f"TLS profile must be one of {', '.join(TLS_PROFILES)}")
    return profile


_nodes = cast(Table, Node.__table__)
# Built once with its parameter (SQLAlchemy memoises its compilation on this object).
_GET_NODE = select(_nodes.c.ae_title, _nodes.c.host, _nodes.c.port, _nodes.c.tls,
                   _nodes.c.client_cert, _nodes.c.roles, _nodes.c.tls_profile).where(
    _nodes.c.ae_title == bindparam("ae"))
_READ_NODE = RawSelect(_GET_NODE)


def _info(row: Node) -> NodeInfo:
    return NodeInfo(
        row.ae_title, row.host, row.port, row.tls, row.client_cert, tuple(row.roles.split(",")),
        row.tls_profile or TLS_PROFILE_STRICT,
    )


class NodeRegistry:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        on_revoke: Callable[[], None] | None = None,
    ) -> None:
        self._sessions = sessions
        # Called after a commit that revoked certificates: the vault re-signs its CRL.
        self._on_revoke = on_revoke
        # Called after every committed change (the vault rewrites its sealed-mode snapshot).
        self.on_change: Callable[[], None] | None = None

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def add(
        self,
        ae_title: str,
        host: str,
        port: int | None = None,
        *,
        tls: bool = False,
        client_cert: bool = False,
        roles: tuple[str, ...] = DEFAULT_ROLES,
        tls_profile: str = TLS_PROFILE_STRICT,
    ) -> NodeInfo:
        ae_title = check_ae_title(ae_title)
        host = check_host(host, tls=tls)
        if port is not None and not 0 < port < 65536:
            raise NodeError("port must be between 1 and 65535")
        if client_cert and not tls:
            raise NodeError("--client-cert requires --tls")
        if check_tls_profile(tls_profile) != TLS_PROFILE_STRICT and not tls:
            raise NodeError("--tls-profile legacy-aes requires --tls")
        with self._sessions.begin() as session:
            if session.scalar(select(Node).where(Node.ae_title == ae_title)):
                raise NodeError(f"node {ae_title} already exists")
            row = Node(
                ae_title=ae_title, host=host, port=port, tls=tls,
                client_cert=client_cert, roles=",".join(roles), tls_profile=tls_profile,
            )
            session.add(row)
            info = _info(row)
        self._changed()
        return info

    def update(
        self,
        ae_title: str,
        *,
        host: str | None = None,
        port: int | None = None,
        tls: bool | None = None,
        client_cert: bool | None = None,
        roles: tuple[str, ...] | None = None,
        tls_profile: str | None = None,
    ) -> NodeInfo:
        with self._sessions.begin() as session:
            row = session.scalar(select(Node).where(Node.ae_title == ae_title.strip()))
            if row is None:
                raise NodeError(f"no node named {ae_title}")
            if host is not None:
                row.host = host.strip()
            if port is not None:
                if not 0 < port < 65536:
                    raise NodeError("port must be between 1 and 65535")
                row.port = port
            if tls is not None:
                row.tls = tls
            if client_cert is not None:
                row.client_cert = client_cert
            if roles is not None:
                row.roles = ",".join(roles)
            if tls_profile is not None:
                row.tls_profile = check_tls_profile(tls_profile)
            if row.client_cert and not row.tls:
                raise NodeError("a client certificate requires TLS")
            if row.tls_profile != TLS_PROFILE_STRICT and not row.tls:
                raise NodeError("the legacy-aes TLS profile requires TLS")
            if host is not None or tls is not None:  # a legacy host stays until changed
                row.host = check_host(row.host, tls=row.tls)
            info = _info(row)
        self._changed()
        return info

    def remove(self, ae_title: str) -> int:
        """Remove a node and revoke every certificate issued to it; returns how many."""
        with self._sessions.begin() as session:
            row = session.scalar(select(Node).where(Node.ae_title == ae_title.strip()))
            if row is None:
                raise NodeError(f"no node named {ae_title}")
            session.delete(row)
            count = self._revoke_in(session, ae_title.strip())
        if count and self._on_revoke is not None:
            self._on_revoke()
        self._changed()
        return count

    # --- certificates -------------------------------------------------------------------

    def record_certificates(self, ae_title: str, issued: Iterable[Issued]) -> None:
        with self._sessions.begin() as session:
            for cert in issued:
                session.add(NodeCertificate(
                    serial=f"{cert.serial:x}", ae_title=ae_title.strip(), kind=cert.kind,
                    issued=utcnow(), not_after=cert.not_after,
                ))
        self._changed()

    def certificate_status(self, ae_title: str, serial: int) -> str:
        """Whether a presented client certificate is one issued to this node, and live."""
        with self._sessions() as session:
            row = session.get(NodeCertificate, f"{serial:x}")
        if row is None or row.ae_title != ae_title.strip() or row.kind != "client":
            return CERT_UNKNOWN
        return CERT_REVOKED if row.revoked is not None else CERT_VALID

    def revoke(self, ae_title: str) -> int:
        """Revoke every certificate issued to a node; returns how many were live."""
        with self._sessions.begin() as session:
            count = self._revoke_in(session, ae_title.strip())
        if count and self._on_revoke is not None:
            self._on_revoke()
        self._changed()
        return count

    @staticmethod
    def _revoke_in(session: Session, ae_title: str) -> int:
        rows = session.scalars(select(NodeCertificate).where(
            NodeCertificate.ae_title == ae_title, NodeCertificate.revoked.is_(None)
        )).all()
        now = utcnow()
        for row in rows:
            row.revoked = now
        return len(rows)

    def revoked(self) -> list[tuple[int, dt.datetime]]:
        """Every revoked serial and when: the content of the CRL."""
        with self._sessions() as session:
            rows = session.execute(select(NodeCertificate.serial, NodeCertificate.revoked)
                                   .where(NodeCertificate.revoked.is_not(None))).all()
        return [(int(serial, 16), _as_utc(when)) for serial, when in rows if when is not None]

    def get(self, ae_title: str) -> NodeInfo | None:
        """The node of an AE title, read at every association (deny by default: a node
        removed or changed applies at the next one). One indexed read through SQLAlchemy
        Core when the index is an engine (issue 17: the ORM session and its instance
        loading were ~1 ms of each association's negotiation), else the ORM."""
        bind = self._sessions.kw.get("bind")
        if isinstance(bind, Engine):
            # on the embedded index straight through the driver (``index.rawselect``)
            found = _READ_NODE.first(bind, {"ae": ae_title.strip()})
            if found is None:
                return None
            title, host, port, tls, client_cert, roles, profile = found
            return NodeInfo(title, host, port, bool(tls), bool(client_cert),
                            tuple(roles.split(",")), profile or TLS_PROFILE_STRICT)
        with self._sessions() as session:
            row = session.scalar(select(Node).where(Node.ae_title == ae_title.strip()))
            return _info(row) if row else None

    def all(self) -> list[NodeInfo]:
        with self._sessions() as session:
            return [_info(r) for r in session.scalars(select(Node).order_by(Node.ae_title))]
