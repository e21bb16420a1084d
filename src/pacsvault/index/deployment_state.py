"""State of the whole deployment that used to be files under one data directory (issue 16,
part 3): the deployment's named secrets, the breach register's versions, the link tables of
de-identification projects (revision ``0007``), TLS node bundles waiting for their download
(``0008``).

Why in the index: several ``serve`` instances share one index and one bucket but each has
its own ``DATA``; a file there is seen by one instance only. A DPO on instance B must see
the breach recorded on A, a pseudonym made on A must be the same on B, an erasure on A must
reach every link line. The same tables on both backends (one code path; SQLCipher is then
simply the only instance's index), portable SQLAlchemy only.

Nothing here is readable from a dump: the secrets are ``Sealed`` (AES-GCM under the index
keys on PostgreSQL; plain inside the encrypted SQLCipher file, as every column there), the
breach versions and link lines are AES-GCM blobs under keys derived from those secrets,
and every lookup column is a keyed digest (HMAC) or an opaque id (``BR-…``). Concurrency is
settled by primary keys and unique constraints, never by file locks: two instances writing
the same breach version or the same secret at once, one insert wins, the other sees it.
"""

from __future__ import annotations

import base64

from sqlalchemy import BigInteger, Index, Integer, LargeBinary, String, UniqueConstraint, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from pacsvault.index.models import Base
from pacsvault.index.sealing import Sealed

# Named secrets (``Vault.named_secret``) that must be one value for the whole deployment:
# what they key is read or written by any instance. The others (sealed-mode material,
# backup repositories) stay in each data directory's ``vault.json``.
SHARED_SECRETS = frozenset({
    "breach-register",  # breach.store: AES-GCM key of every breach version
    "deidentify-pseudonyms",  # crypto.keys.DEIDENTIFY_SECRET: pseudonyms and link tables
    "erasure-subject",  # storage.erasure_requests.SUBJECT_SECRET: digests of subjects
})


class VaultSecretRow(Base):
    """One deployment-wide named secret (base64), sealed."""

    __tablename__ = "vault_secrets"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    secret: Mapped[str] = mapped_column(Sealed("vault_secrets.secret"))


class BreachVersionRow(Base):
    """One version of one breach record, written once (``breach.store``): nonce +
    AES-GCM ciphertext, the breach id and version number as associated data."""

    __tablename__ = "breach_versions"
    __table_args__ = (UniqueConstraint("breach_id", "version",
                                       name="uq_breach_versions_breach_id_version"),)
    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    breach_id: Mapped[str] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(Integer)
    blob: Mapped[bytes] = mapped_column(LargeBinary)


class LinkRow(Base):
    """One line of a de-identification project's link table (``deidentify.links``):
    keyed digests of the project, the pseudonym and the patient ID (lookups, uniqueness,
    erasure), the pair itself AES-GCM sealed."""

    __tablename__ = "deidentify_links"
    __table_args__ = (
        UniqueConstraint("project", "pseudonym", name="uq_deidentify_links_project_pseudonym"),
        Index("ix_deidentify_links_patient", "patient"),
    )
    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    project: Mapped[bytes] = mapped_column(LargeBinary(16))
    pseudonym: Mapped[bytes] = mapped_column(LargeBinary(32))
    patient: Mapped[bytes] = mapped_column(LargeBinary(32))
    blob: Mapped[bytes] = mapped_column(LargeBinary)


class NodeBundleRow(Base):
    """A TLS node's certificate bundle waiting for its one download (``web.node_bundle``):
    the administrator's issue and download may reach two instances. Keyed by the SHA-256
    of the AE title; the body holds certificates and keys encrypted with the vault's TLS
    key password (no patient data)."""

    __tablename__ = "node_bundles"
    node: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    created: Mapped[int] = mapped_column(BigInteger)  # microseconds since the epoch
    body: Mapped[bytes] = mapped_column(LargeBinary)


def read_secret(sessions: sessionmaker[Session], name: str) -> bytes | None:
    with sessions() as session:
        value = session.scalar(select(VaultSecretRow.secret).where(VaultSecretRow.name == name))
    return None if value is None else base64.b64decode(value)


def agree_secret(sessions: sessionmaker[Session], name: str, offer: bytes) -> bytes:
    """The deployment's value of ``name``: the one in the index, else ``offer`` once
    stored. Two instances offering at once: the primary key keeps the first, both answer
    with it."""
    found = read_secret(sessions, name)
    if found is not None:
        return found
    try:
        with sessions.begin() as session:
            session.add(VaultSecretRow(name=name, secret=base64.b64encode(offer).decode()))
    except IntegrityError:
        pass  # another instance stored its value first: that one is the deployment's
    found = read_secret(sessions, name)
    if found is None:
        raise RuntimeError(f"the shared secret {name} was neither stored nor found")
    return found


def replace_secret(sessions: sessionmaker[Session], name: str, secret: bytes) -> None:
    """Store a value that is not random (``Vault.set_named_secret``), replacing any."""
    with sessions.begin() as session:
        row = session.get(VaultSecretRow, name)
        encoded = base64.b64encode(secret).decode()
        if row is None:
            session.add(VaultSecretRow(name=name, secret=encoded))
        else:
            row.secret = encoded
