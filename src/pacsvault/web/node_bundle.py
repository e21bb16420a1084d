"""A TLS node's certificate bundle from its admin page: issued once, downloaded once.

``pacsvault node cert NODE --out DIR`` writes the node's files on the server's disk; from
the browser, the administrator gets them as one PEM file instead (issue 20, item 8): the
node's client certificate and its private key, its listener's certificate and key when it
has a DICOM port (same rules as the command line: ``tls.issue_node``), and the practice CA.

Two steps, because a download can be lost and a page can be reloaded:

1. *issue* (a POST): the certificates are signed by the vault's CA and recorded in the
   registry (``node.cert`` event, as the command line). The keys are kept **encrypted**
   with the vault's TLS key password (the same protection as the CA key) in the index
   (``node_bundles``, ``index.deployment_state``; a file under ``DATA/tls/pending`` before
   issue 16: the download may reach another instance than the issue), until downloaded;
2. *download* (a POST): the pending row is claimed by deleting it (two clicks, two workers
   or two instances cannot both get it: one ``DELETE`` removes the row), and the keys are
   decrypted into the response. From then on the key exists nowhere on the server: a second
   download is refused, and a lost bundle means issuing a new certificate (and revoking the old one
   with ``pacsvault node cert --revoke`` if it may have leaked).

A bundle not downloaded within ``PENDING_HOURS`` is deleted when next asked for; one
encrypted before a master key rotation (which changes the TLS key password) is refused.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import delete, select

from pacsvault.crypto import tls
from pacsvault.index.deployment_state import NodeBundleRow
from pacsvault.index.nodes import NodeInfo
from pacsvault.vault import Vault

PENDING_DIR = "pending"  # DATA/tls/pending, before issue 16 (not read any more)
PENDING_HOURS = 24


class BundleGone(Exception):
    """No bundle waits for this node: never issued, already downloaded, or expired."""


@dataclass(frozen=True)
class Bundle:
    filename: str
    pem: bytes
    serials: list[str]


def _node_key(ae_title: str) -> bytes:
    return hashlib.sha256(ae_title.strip().encode()).digest()


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def pending(vault: Vault, ae_title: str, now: float | None = None) -> bool:
    """Whether a bundle waits to be downloaded (an expired one is deleted here)."""
    key = _node_key(ae_title)
    with vault.sessions() as session:
        created = session.scalar(select(NodeBundleRow.created).where(NodeBundleRow.node == key))
    if created is None:
        return False
    if (now or time.time()) - created / 1e6 > PENDING_HOURS * 3600:
        with vault.sessions.begin() as session:
            session.execute(delete(NodeBundleRow).where(NodeBundleRow.node == key,
                                                        NodeBundleRow.created == created))
        return False
    return True


def issue(vault: Vault, node: NodeInfo) -> list[tls.IssuedCert]:
    """Sign the node's certificates, record them, keep the keys encrypted until download.

    A bundle still pending for the node is replaced (its certificates stay recorded: they
    were never delivered, revoking them is ``node cert --revoke``'s business)."""
    paths, password = vault.layout.tls, vault.tls_password()
    jobs: list[tuple[str, list[x509.GeneralName], x509.ObjectIdentifier]] = [
        ("client", [x509.UniformResourceIdentifier(tls.node_uri(node.ae_title))],
         tls.ClientAuth)]
    if node.tls and node.port is not None and tls.permits(paths, _host_name(node.host)):
        jobs.append(("listener", [_host_name(node.host)], tls.ServerAuth))
    items: list[dict[str, str]] = []
    issued: list[tls.IssuedCert] = []
    for kind, sans, usage in jobs:
        cert_pem, key_pem = tls.issue(paths, password, node.ae_title, sans, eku=[usage],
                                      days=tls.NODE_DAYS, encrypt_key=True)
        cert = x509.load_pem_x509_certificate(cert_pem)
        items.append({"kind": kind, "cert": cert_pem.decode(), "key": key_pem.decode()})
        issued.append(tls.IssuedCert(kind, cert.serial_number, cert.not_valid_after_utc,
                                     paths.ca_cert))
    body = json.dumps({"ae_title": node.ae_title, "items": items}).encode()
    key, created = _node_key(node.ae_title), int(time.time() * 1e6)
    with vault.sessions.begin() as session:  # replaces a bundle still pending
        session.execute(delete(NodeBundleRow).where(NodeBundleRow.node == key))
        session.add(NodeBundleRow(node=key, created=created, body=body))
    vault.nodes.record_certificates(node.ae_title, issued)
    return issued


def take(vault: Vault, ae_title: str) -> Bundle:
    """The bundle, once: claimed by rename, deleted, keys decrypted for the response."""
    if not pending(vault, ae_title):
        raise BundleGone(ae_title)
    node_key = _node_key(ae_title)
    with vault.sessions.begin() as session:
        row = session.get(NodeBundleRow, node_key)
        if row is None:
            raise BundleGone(ae_title)
        body, created = bytes(row.body), row.created
        taken = session.execute(delete(NodeBundleRow).where(
            NodeBundleRow.node == node_key, NodeBundleRow.created == created))
        if getattr(taken, "rowcount", 0) != 1:  # another worker or instance took it
            raise BundleGone(ae_title)
    stored = json.loads(body)
    password = vault.tls_password()
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"# pacsvault: TLS certificate bundle of the DICOM node {stored['ae_title']}, "
             f"delivered {now}.\n# In order: each certificate followed by its private key "
             "(secret: install it on the node, then delete this file), then the "
             "practice's CA.\n"]
    serials: list[str] = []
    for item in stored["items"]:
        try:
            key = serialization.load_pem_private_key(item["key"].encode(), password)
        except (ValueError, TypeError):  # encrypted before a key rotation: issue again
            raise BundleGone(ae_title) from None
        plain = key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()).decode()
        serials.append(f"{x509.load_pem_x509_certificate(item['cert'].encode()).serial_number:x}")
        parts += [f"# {item['kind']} certificate\n", item["cert"],
                  f"# {item['kind']} private key\n", plain]
    parts += ["# CA certificate\n", vault.layout.tls.ca_cert.read_text()]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stored["ae_title"])
    return Bundle(f"{safe}-tls-bundle.pem", "".join(parts).encode(), serials)
