"""``pacsvault init`` and ``pacsvault status``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pacsvault.audit import Recorder
from pacsvault.cli.common import add_data_args, data_dir, open_vault, say
from pacsvault.crypto.tls import certificate_expiry
from pacsvault.vault import Vault, create


def register(sub: Any) -> None:
    p = sub.add_parser("init", help="create a new vault (keys, certificates, settings)")
    add_data_args(p)
    p.add_argument("--ae-title", default="PACSVAULT", help="this archive's AE title")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("status", help="listeners, nodes, counts and storage size")
    add_data_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)


FIRST_ADMIN = "admin"


def init_vault(root: Path, key_file: Path | None, ae_title: str) -> None:
    code = create(root, key_file=key_file, ae_title=ae_title)
    password, https_port = _first_admin(root, key_file)
    say(f"Created a vault in {root}.")
    say("RECOVERY CODE (shown once; write it down and keep it away from this server).")
    say("It restores the master key if the key file is lost:")
    # Secrets go to stdout only, so they can be captured or printed, never to a log:
    # the recovery code alone on the first line, the first admin's password on the second.
    print(code, flush=True)
    say(f"FIRST ADMINISTRATOR: user '{FIRST_ADMIN}', password below (shown once). Sign in "
        f"at https://<this server>:{https_port}/ and set up the second factor; then create one "
        "account per person with 'pacsvault user add'.")
    print(f"{FIRST_ADMIN} password: {password}", flush=True)
    say("Next: register your modality with 'pacsvault node add AE_TITLE --host ADDRESS', "
        "then 'pacsvault serve'.")


def _first_admin(root: Path, key_file: Path | None) -> tuple[str, int]:
    """Create the first admin account with a random password: (password, HTTPS port)."""
    vault = Vault.open(root, key_file)
    try:
        # A new vault's trail starts empty (its first record is what the practice does
        # next), so the account's creation is not recorded as an event.
        vault.recorder = Recorder([])
        _info, password = vault.accounts.first_admin(FIRST_ADMIN, by="init")
        https_port = vault.settings.web.https_port
    finally:
        vault.close()
    return password, https_port


def cmd_init(args: argparse.Namespace) -> int:
    init_vault(data_dir(args), args.key_file, args.ae_title)
    return 0


def _running(state_path: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(state_path.read_text("utf-8"))
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return state


def cmd_status(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    try:
        settings = vault.settings
        state = _running(vault.layout.state)
        counts = vault.archive.counts()
        on_disk = sum(
            f.stat().st_size for f in vault.layout.objects.rglob("*.pvo") if f.is_file()
        )
        report: dict[str, Any] = {
            "data": str(vault.layout.root),
            "ae_title": settings.server.ae_title,
            "server": (
                {"running": True, **state} if state else {"running": False}
            ),
            "configured": {
                "bind": settings.server.bind,
                "dicom_port": settings.dicom.port if settings.dicom.plain_enabled else None,
                "dicom_tls_port": settings.dicom.tls_port,
            },
            "nodes": [
                {"ae_title": n.ae_title, "host": n.host, "port": n.port, "tls": n.tls,
                 "client_cert": n.client_cert, "roles": list(n.roles)}
                for n in vault.nodes.all()
            ],
            "counts": {k: v for k, v in counts.items() if k != "bytes"},
            "storage": {"received_bytes": counts["bytes"], "encrypted_bytes": on_disk},
            "certificate_expires": certificate_expiry(
                vault.layout.tls.server_cert
            ).isoformat(timespec="seconds"),
        }
    finally:
        vault.close()
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    srv = report["server"]
    conf = report["configured"]
    print(f"Vault        {report['data']}  (AE title {report['ae_title']})")
    if srv["running"]:
        print(f"Server       running, pid {srv['pid']}; DICOM plain port "
              f"{srv.get('dicom_port') or 'off'}, DICOM TLS port {srv.get('dicom_tls_port')}")
    else:
        print(f"Server       not running (configured: plain {conf['dicom_port'] or 'off'}, "
              f"TLS {conf['dicom_tls_port']} on {conf['bind']})")
    print(f"Nodes        {len(report['nodes'])}")
    for n in report["nodes"]:
        flags = ",".join(n["roles"]) + (" tls" if n["tls"] else "") + (
            " client-cert" if n["client_cert"] else "")
        print(f"  {n['ae_title']:<16} {n['host']}{':' + str(n['port']) if n['port'] else ''}"
              f"  {flags}")
    c = report["counts"]
    print(f"Contents     {c['patients']} patients, {c['studies']} studies, "
          f"{c['series']} series, {c['instances']} instances")
    s = report["storage"]
    print(f"Storage      {_size(s['encrypted_bytes'])} encrypted "
          f"({_size(s['received_bytes'])} received)")
    print(f"Certificate  server certificate valid until {report['certificate_expires']}")
    return 0


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"
