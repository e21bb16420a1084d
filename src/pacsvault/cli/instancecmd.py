"""``pacsvault instances add|list``: several instances of one vault (issue 16, part 3).

An instance is a data directory of the same vault (same vault id, key check, recovery data
and settings, the same CA) with its own name, listener certificate and audit chain. Every
instance reads and writes the one shared index (PostgreSQL) and bucket (S3): an embedded
vault (SQLCipher index, objects in ``DATA/objects``) cannot have another instance, so it
is refused. The master key file is never copied here: the IT provider carries it to the
other machine with its protection (passphrase, machine binding), as for a restore.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
from pathlib import Path
from typing import Any

from pacsvault import vaultfile
from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.cli.common import CommandError, add_data_args, open_vault, say
from pacsvault.vault import Layout, Vault


def register(sub: Any) -> None:
    parser = sub.add_parser("instances", help="several serve instances sharing one index "
                            "and bucket (PostgreSQL + S3)")
    isub = parser.add_subparsers(dest="instances_command", required=True, metavar="ACTION")

    p = isub.add_parser("add", help="prepare the data directory of another instance")
    add_data_args(p)
    p.add_argument("name", help="the new instance's name (a-z, 0-9, '-'; at most 32)")
    p.add_argument("--to", dest="to", type=Path, required=True,
                   help="its data directory (new or empty)")
    p.add_argument("--host", action="append", default=[],
                   help="a DNS name or address of its listener certificate (repeat; "
                   "default: this machine's names)")
    p.set_defaults(func=cmd_add)

    p = isub.add_parser("list", help="the instances sharing the index and their last record")
    add_data_args(p)
    p.set_defaults(func=cmd_list)


def _sans(hosts: list[str]) -> list[Any]:
    from cryptography import x509

    from pacsvault.crypto import tls

    if not hosts:
        names, addrs = tls.local_names()
        return [x509.DNSName(n) for n in names] + [x509.IPAddress(a) for a in addrs]
    sans: list[Any] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return sans


def add_instance(vault: Vault, name: str, dest: Path, hosts: list[str] | None = None) -> Path:
    """Make ``dest`` a data directory of ``vault`` named ``name``; returns ``dest``.

    The name is reserved in the index first (its anchor row at record 0), so two
    directories can never write one chain."""
    from pacsvault.audit import instances
    from pacsvault.crypto import tls
    from pacsvault.service import lock as instance_lock
    from pacsvault.storage.objects import ObjectStore

    settings = vault.settings
    if not settings.index.is_postgres:
        raise CommandError("this vault's index is the embedded one (SQLCipher, one "
                           "machine): several instances need a shared PostgreSQL index "
                           "([index] url; see 'pacsvault migrate')")
    if not settings.storage.url:
        raise CommandError("this vault's objects are files in its data directory: several "
                           "instances need a shared bucket ([storage] url = \"s3://...\")")
    if not vaultfile.valid_instance(name):
        raise CommandError("an instance name is 1 to 32 of a-z, 0-9 and '-', starting with "
                           "a letter or digit")
    if dest.exists() and any(dest.iterdir()):
        raise CommandError(f"{dest} is not empty; choose a new directory")
    meta = vaultfile.read(vault.layout.meta)
    if isinstance(meta.get("rotation"), dict):
        raise CommandError("a master key rotation is not finished; complete it first")
    taken = set(instances.heads(vault.engine)) | {vault.audit.instance}
    if name in taken:
        raise CommandError(f"an instance named {name!r} already exists")
    with vault.engine.begin() as conn:  # reserved: its anchor, at record 0
        instances.insert_anchor(conn, name, 0, "0" * 64, retry=True)

    layout = Layout(dest)
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(dest, 0o700)
    shutil.copyfile(vault.layout.config, layout.config)
    os.chmod(layout.config, 0o600)
    # The same CA (its key sealed under the vault's TLS password), a new listener pair.
    paths, source = layout.tls, vault.layout.tls
    paths.root.mkdir(mode=0o700)
    for part in (source.ca_cert, source.ca_key, source.crl):
        if part.exists():
            shutil.copy2(part, paths.root / part.name)
    password = vault.tls_password()
    cert_pem, key_pem = tls.issue(paths, password, settings.server.ae_title, _sans(hosts or []),
                                  eku=[tls.ServerAuth])
    _private(paths.server_key, key_pem)
    paths.server_cert.write_bytes(cert_pem)
    tls.create_rsa_server_cert(paths, password)
    tls.create_client_cert(paths, password, settings.server.ae_title)
    ObjectStore(layout.objects).create()
    layout.audit.mkdir(mode=0o700)
    (layout.audit / "trail.jsonl").touch(mode=0o600)
    instance_lock.create_lock_file(dest)
    copy = {k: v for k, v in meta.items() if k != "rotation"}
    copy["instance"] = name
    # vault.json last: its presence marks a complete data directory.
    _private(layout.meta, json.dumps(copy, indent=2).encode("utf-8"))
    vault.recorder.emit(AuditEvent(
        action="instance.added", outcome=Outcome.SUCCESS,
        code=EventCode.APPLICATION_ACTIVITY, actor_user="local-admin",
        message=f"data directory of instance {name} prepared", detail={"instance": name}))
    return dest


def _private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def cmd_add(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    try:
        dest = add_instance(vault, args.name, args.to, list(args.host))
        key_file = vault.key_path
    finally:
        vault.close()
    print(f"instance {args.name} prepared in {dest}: same vault, same shared index and "
          "bucket, its own listener certificate and audit chain")
    print(f"The master key file ({key_file}) was NOT copied: copy it to the other machine "
          "yourself, with its protection (passphrase or machine binding), to the path "
          "'key_file' names in its pacsvault.toml, and keep it out of the data directory.")
    print(f"Then on that machine: pacsvault serve --data {dest}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from pacsvault.audit import instances

    vault = open_vault(args)
    try:
        found = instances.heads(vault.engine)
        mine = vault.audit.instance
    finally:
        vault.close()
    if not found:
        say("No instance has written to the trail yet.")
        return 0
    for name, head in sorted(found.items()):
        here = " (this one)" if name == mine else ""
        state = f", BROKEN: {head.broken}" if head.broken else ""
        print(f"{name}{here}: last record {head.seq}{state}")
    return 0
