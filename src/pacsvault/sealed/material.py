"""What a sealed start needs, made at every normal open (while the master key is here).

- The HPKE key pair: the X25519 private key is the named secret ``sealed-x25519``
  (``vault.json["secrets"]``, wrapped by the master key: a rotation re-wraps it), its
  public key in clear in ``vault.json["sealed"]``. A thief of the data directory can seal
  *to* it (as anyone can) but never open what was sealed.
- The node registry snapshot ``DATA/sealed/nodes.json`` (AE titles, hosts, roles, TLS
  flags, certificate serials and revocations: no patient data), rewritten at each open
  and after each node change, signed with Ed25519 (named secret
  ``sealed-snapshot-ed25519``; public key in ``vault.json["sealed"]``). The signature
  catches a damaged or hand-edited file; someone able to write the data directory can
  also replace ``vault.json``'s public key, as they can defeat anything kept there.
- The listener TLS keys: copies of ``server.key.enc`` / ``server-rsa.key.enc`` re-encrypted
  under a *boot secret* kept in a 0600 file beside the key file (``<key file>.sealed-tls``,
  never in the data directory), so the TLS port keeps its identity while sealed. Only the
  listener keys: the CA key (which issues node certificates) and the outbound client key
  stay under the master key. Trade-off, documented: whoever can read the key directory
  while the key itself is protected can impersonate the listener, never read an image.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from pacsvault.crypto.tls import TlsPaths
from pacsvault.fsutil import write_atomic, write_durably
from pacsvault.index.nodes import CERT_REVOKED, CERT_UNKNOWN, CERT_VALID, NodeInfo

if TYPE_CHECKING:
    from pacsvault.vault import Layout, Vault

log = logging.getLogger("pacsvault.sealed")

SEALED_DIR = "sealed"
HPKE_SECRET = "sealed-x25519"  # noqa: S105 (the name of a named secret)
SNAPSHOT_SECRET = "sealed-snapshot-ed25519"  # noqa: S105 (a name)
META_KEY = "sealed"
SNAPSHOT_NAME = "nodes.json"
SNAPSHOT_FORMAT = "pacsvault-sealed-nodes/1"
BOOT_SUFFIX = ".sealed-tls"
BOOT_CHECK = "boot.sha256"


class SealedUnavailable(Exception):
    """The sealed-mode material is missing or does not verify (message is user-facing)."""


def sealed_dir(root: Path) -> Path:
    return root / SEALED_DIR


def tls_paths(root: Path) -> TlsPaths:
    """The listener-only TLS copy used while sealed (same file names as ``DATA/tls``)."""
    return TlsPaths(sealed_dir(root) / "tls")


def boot_secret_path(key_path: Path) -> Path:
    return key_path.with_name(key_path.name + BOOT_SUFFIX)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, data, mode)


# --- at every normal open -----------------------------------------------------------------


def hpke_private(vault: Vault) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(vault.named_secret(HPKE_SECRET))


def _snapshot_signer(vault: Vault) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(vault.named_secret(SNAPSHOT_SECRET))


def ensure(vault: Vault, key_path: Path | None) -> None:
    """Make or refresh the sealed-mode material (see the module docstring)."""
    public = hpke_private(vault).public_key().public_bytes_raw()
    signer = _snapshot_signer(vault).public_key().public_bytes_raw()
    wanted = {"x25519_public": _b64(public), "snapshot_public": _b64(signer),
              "hpke": "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM"}
    if read_public(vault.layout) != wanted:
        def put(meta: dict[str, object]) -> None:
            meta[META_KEY] = wanted

        vault.update_meta(put)
    write_snapshot(vault)
    if key_path is not None:
        _ensure_boot_tls(vault, key_path)


def read_public(layout: Layout) -> dict[str, Any]:
    try:
        meta = json.loads(layout.meta.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    value = meta.get(META_KEY) if isinstance(meta, dict) else None
    return value if isinstance(value, dict) else {}


def write_snapshot(vault: Vault) -> None:
    """The node registry as the policy needs it without the index, signed."""
    from sqlalchemy import select

    from pacsvault.index.models import NodeCertificate

    nodes = [{"ae_title": n.ae_title, "host": n.host, "port": n.port, "tls": n.tls,
              "client_cert": n.client_cert, "roles": list(n.roles),
              "tls_profile": n.tls_profile} for n in vault.nodes.all()]
    with vault.sessions() as session:
        certificates = [{"serial": c.serial, "ae_title": c.ae_title, "kind": c.kind,
                         "revoked": c.revoked is not None}
                        for c in session.scalars(select(NodeCertificate)
                                                 .order_by(NodeCertificate.serial))]
    path = sealed_dir(vault.layout.root) / SNAPSHOT_NAME
    body: dict[str, Any] = {"format": SNAPSHOT_FORMAT, "vault_id": vault.vault_id,
                            "nodes": nodes, "certificates": certificates}
    signer = _snapshot_signer(vault)
    try:  # every CLI command opens the vault: no write (and fsync) when nothing changed
        current = json.loads(path.read_bytes())
        sig = base64.b64decode(current.pop("sig"))
        signer.public_key().verify(sig, _canonical(current))
        if {k: v for k, v in current.items() if k != "written"} == body:
            return
    except (OSError, ValueError, AttributeError, KeyError, TypeError, InvalidSignature):
        pass
    body["written"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    body["sig"] = _b64(signer.sign(_canonical(body)))
    _write_atomic(path, _canonical(body))


def _ensure_boot_tls(vault: Vault, key_path: Path) -> None:
    source = vault.layout.tls
    target = tls_paths(vault.layout.root)
    secret_path = boot_secret_path(key_path)
    if not source.server_cert.exists() or not source.server_key.exists():
        return
    made = False
    if not secret_path.exists():
        secret_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            write_durably(fd, [secrets.token_hex(32).encode("ascii") + b"\n"])
        finally:
            os.close(fd)
        if os.geteuid() == 0:  # an admin's command as root: the service reads it, not root
            owner = key_path.stat()
            os.chown(secret_path, owner.st_uid, owner.st_gid)
        made = True
    pairs = [(source.server_cert, source.server_key, target.server_cert, target.server_key)]
    if source.server_rsa_cert.exists() and source.server_rsa_key.exists():
        pairs.append((source.server_rsa_cert, source.server_rsa_key, target.server_rsa_cert,
                      target.server_rsa_key))
    current = all(dst_cert.exists() and dst_key.exists()
                  and dst_cert.read_bytes() == src_cert.read_bytes()
                  for src_cert, _, dst_cert, dst_key in pairs)
    current = current and target.ca_cert.exists() \
        and target.ca_cert.read_bytes() == source.ca_cert.read_bytes()
    password = _read_boot_secret(secret_path)
    # Which boot secret the copies are under (a hash of 256 random bits reveals nothing):
    # a data dir moved or restored beside another key file gets its copies redone.
    check = target.root / BOOT_CHECK
    fingerprint = hashlib.sha256(password).hexdigest().encode("ascii")
    current = current and check.exists() and check.read_bytes() == fingerprint
    if current and not made:
        return
    for src_cert, src_key, dst_cert, dst_key in pairs:
        key = serialization.load_pem_private_key(src_key.read_bytes(), vault.tls_password())
        _write_atomic(dst_key, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password)))
        _write_atomic(dst_cert, src_cert.read_bytes(), 0o644)
    _write_atomic(target.ca_cert, source.ca_cert.read_bytes(), 0o644)
    _write_atomic(check, fingerprint, 0o644)


def _read_boot_secret(path: Path) -> bytes:
    return path.read_bytes().strip()


# --- while sealed -------------------------------------------------------------------------


@dataclass(frozen=True)
class SealedKeys:
    """The public halves read from ``vault.json``: enough to seal, never to open."""

    hpke_public: X25519PublicKey
    snapshot_public: Ed25519PublicKey


def load_public(layout: Layout) -> SealedKeys:
    value = read_public(layout)
    try:
        return SealedKeys(
            X25519PublicKey.from_public_bytes(base64.b64decode(value["x25519_public"])),
            Ed25519PublicKey.from_public_bytes(base64.b64decode(value["snapshot_public"])),
        )
    except (KeyError, ValueError, TypeError):
        raise SealedUnavailable(
            "this vault has no sealed-mode keys yet (they are made the first time it is "
            "opened with its key by this version): it cannot receive while sealed"
        ) from None


def boot_password(key_path: Path) -> bytes | None:
    """The listener TLS copy's password, None when its file is not there."""
    try:
        return _read_boot_secret(boot_secret_path(key_path))
    except OSError:
        return None


class SnapshotRegistry:
    """The node registry's read side from the signed snapshot (what ``AssociationPolicy``
    and ``KnownHosts`` call): the same policy code decides while sealed."""

    def __init__(self, nodes: list[NodeInfo], certificates: dict[str, tuple[str, str, bool]]):
        self._nodes = {n.ae_title: n for n in nodes}
        self._certificates = certificates

    @classmethod
    def load(cls, layout: Layout, keys: SealedKeys, vault_id: str) -> SnapshotRegistry:
        path = sealed_dir(layout.root) / SNAPSHOT_NAME
        try:
            body = json.loads(path.read_bytes())
            sig = base64.b64decode(body.pop("sig"))
            keys.snapshot_public.verify(sig, _canonical(body))
        except FileNotFoundError:
            raise SealedUnavailable(f"{path} is missing: no node could be recognised while "
                                    "sealed") from None
        except (InvalidSignature, ValueError, KeyError, TypeError, AttributeError):
            raise SealedUnavailable(f"{path} does not verify (damaged or edited): no node "
                                    "is trusted while sealed") from None
        if body.get("format") != SNAPSHOT_FORMAT or body.get("vault_id") != vault_id:
            raise SealedUnavailable(f"{path} belongs to another vault")
        nodes = [NodeInfo(str(n["ae_title"]), str(n["host"]), n.get("port"), bool(n["tls"]),
                          bool(n["client_cert"]), tuple(n["roles"]), str(n["tls_profile"]))
                 for n in body["nodes"]]
        certs = {str(c["serial"]): (str(c["ae_title"]), str(c["kind"]), bool(c["revoked"]))
                 for c in body["certificates"]}
        return cls(nodes, certs)

    @classmethod
    def empty(cls) -> SnapshotRegistry:
        return cls([], {})

    def get(self, ae_title: str) -> NodeInfo | None:
        return self._nodes.get(ae_title.strip())

    def all(self) -> list[NodeInfo]:
        return [self._nodes[k] for k in sorted(self._nodes)]

    def certificate_status(self, ae_title: str, serial: int) -> str:
        found = self._certificates.get(f"{serial:x}")
        if found is None or found[0] != ae_title.strip() or found[1] != "client":
            return CERT_UNKNOWN
        return CERT_REVOKED if found[2] else CERT_VALID
