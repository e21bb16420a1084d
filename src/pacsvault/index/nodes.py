"""The node registry: which DICOM peers exist, where they are, and what they may do."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacsvault.index.models import Node

ROLES = ("store", "query", "retrieve")
DEFAULT_ROLES = ("store",)
_AE = re.compile(r"^[ -~]{1,16}$")


class NodeError(Exception):
    """Bad node definition or unknown node (message is user-facing)."""


@dataclass(frozen=True)
class NodeInfo:
    ae_title: str
    host: str
    port: int | None
    tls: bool
    client_cert: bool
    roles: tuple[str, ...]

    def may(self, role: str) -> bool:
        return role in self.roles


def parse_roles(text: str) -> tuple[str, ...]:
    roles = tuple(dict.fromkeys(r.strip() for r in text.split(",") if r.strip()))
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise NodeError(f"roles must be among {', '.join(ROLES)}")
    return roles


def check_ae_title(ae: str) -> str:
    ae = ae.strip()
    if not _AE.match(ae) or "\\" in ae:
        raise NodeError("an AE title is 1 to 16 printable ASCII characters, no backslash")
    return ae


def _info(row: Node) -> NodeInfo:
    return NodeInfo(
        row.ae_title, row.host, row.port, row.tls, row.client_cert, tuple(row.roles.split(","))
    )


class NodeRegistry:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def add(
        self,
        ae_title: str,
        host: str,
        port: int | None = None,
        *,
        tls: bool = False,
        client_cert: bool = False,
        roles: tuple[str, ...] = DEFAULT_ROLES,
    ) -> NodeInfo:
        ae_title = check_ae_title(ae_title)
        if not host.strip():
            raise NodeError("a node needs a host address")
        if port is not None and not 0 < port < 65536:
            raise NodeError("port must be between 1 and 65535")
        if client_cert and not tls:
            raise NodeError("--client-cert requires --tls")
        with self._sessions.begin() as session:
            if session.scalar(select(Node).where(Node.ae_title == ae_title)):
                raise NodeError(f"node {ae_title} already exists")
            row = Node(
                ae_title=ae_title, host=host.strip(), port=port, tls=tls,
                client_cert=client_cert, roles=",".join(roles),
            )
            session.add(row)
            return _info(row)

    def update(
        self,
        ae_title: str,
        *,
        host: str | None = None,
        port: int | None = None,
        tls: bool | None = None,
        client_cert: bool | None = None,
        roles: tuple[str, ...] | None = None,
    ) -> NodeInfo:
        with self._sessions.begin() as session:
            row = session.scalar(select(Node).where(Node.ae_title == ae_title.strip()))
            if row is None:
                raise NodeError(f"no node named {ae_title}")
            if host is not None:
                if not host.strip():
                    raise NodeError("a node needs a host address")
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
            if row.client_cert and not row.tls:
                raise NodeError("a client certificate requires TLS")
            return _info(row)

    def remove(self, ae_title: str) -> None:
        with self._sessions.begin() as session:
            row = session.scalar(select(Node).where(Node.ae_title == ae_title.strip()))
            if row is None:
                raise NodeError(f"no node named {ae_title}")
            session.delete(row)

    def get(self, ae_title: str) -> NodeInfo | None:
        with self._sessions() as session:
            row = session.scalar(select(Node).where(Node.ae_title == ae_title.strip()))
            return _info(row) if row else None

    def all(self) -> list[NodeInfo]:
        with self._sessions() as session:
            return [_info(r) for r in session.scalars(select(Node).order_by(Node.ae_title))]
