"""``pacsvault init`` and ``pacsvault status``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Any

from pacsvault.audit import Recorder
from pacsvault.cli.common import CommandError, add_data_args, data_dir, open_vault, say
from pacsvault.crypto.tls import ca_is_name_constrained, certificate_expiry
from pacsvault.fsutil import write_private_new
from pacsvault.index import stats
from pacsvault.vault import Vault, create, resolve_key_path


def register(sub: Any) -> None:
    p = sub.add_parser("init", help="create a new vault (keys, certificates, settings)")
    add_data_args(p)
    p.add_argument("--ae-title", default="PACSVAULT", help="this archive's AE title")
    p.add_argument("--admin", metavar="NAME",
                   help="name of the first administrator account (default: asked at a "
                   "terminal, else admin-<6 random characters>)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("status", help="listeners, nodes, counts and storage size")
    add_data_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)


SECRETS_SUFFIX = ".first-run-secrets.txt"
PRIVATE_SUBDIR = "pacsvault-first-run"
SHARED_NAMES = {"admin", "administrator", "administrateur", "root", "pacsvault", "user"}


def _admin_name(chosen: str | None, ask: bool) -> str:
    """The first administrator's name: given, typed at a terminal, or generated.

    Never a fixed default: a predictable administrator name is half of a guess.
    """
    # imported here: argon2 & co. only for init, not for status (issue 12, defect 7)
    from pacsvault.accounts.service import AccountError, check_name, generate_admin_name

    if chosen:
        try:
            name = check_name(chosen)
        except AccountError as exc:
            raise CommandError(str(exc)) from None
        if name in SHARED_NAMES:
            say(f"Note: '{name}' is an easily guessed administrator name.")
        return name
    suggested = generate_admin_name()
    if not (ask and sys.stdin.isatty() and sys.stdout.isatty()):
        return suggested
    for _ in range(3):
        typed = input(f"Name of the first administrator account [{suggested}]: ").strip()
        if not typed:
            return suggested
        try:
            return check_name(typed)
        except AccountError as exc:
            say(str(exc))
    raise CommandError("no valid administrator name given; nothing was created")


def _private_dir(key_dir: Path) -> Path:
    """A directory only this user can enter, for the secrets file: the key's own directory
    when it is one (``keys.write_key_file`` makes it 0700), else a 0700 subdirectory."""
    info = key_dir.lstat()
    if stat.S_ISDIR(info.st_mode) and not info.st_mode & 0o077 and info.st_uid == os.getuid():
        return key_dir
    private = key_dir / PRIVATE_SUBDIR
    private.mkdir(mode=0o700, exist_ok=True)
    info = private.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise CommandError(f"{private} is not a directory of this user")
    if info.st_mode & 0o077:
        private.chmod(0o700)
    return private


def write_first_run_secrets(key_path: Path, root: Path, code: str, admin: str,
                            password: str, https_port: int) -> Path:
    """Write the one-time secrets to a new 0600 file in a 0700 directory beside the key
    file, never in the data directory: the recovery code and ``vault.json`` together give
    the master key, so the two must not travel (or be backed up) together."""
    folder = _private_dir(key_path.parent)
    body = (
        f"# pacsvault: the one-time secrets of the vault created in {root.resolve()}\n"
        f"# on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC. Readable by you only.\n"
        "# 1. Write the recovery code down on paper and keep it away from this server:\n"
        "#    with vault.json it restores the master key if the key file is lost.\n"
        f"# 2. Sign in at https://<this server>:{https_port}/ as the administrator below\n"
        "#    and set up the second factor.\n"
        "# 3. Then delete this file (shred -u FILE).\n"
        f"recovery code: {code}\n"
        f"administrator: {admin}\n"
        f"password: {password}\n"
    )
    path = write_private_new(
        folder, (key_path.stem + ("" if n == 1 else f"-{n}") + SECRETS_SUFFIX
                 for n in range(1, 100)), body)
    if path is None:
        raise CommandError(f"cannot create a secrets file in {folder}")
    return path


def init_vault(root: Path, key_file: Path | None, ae_title: str, admin: str | None = None,
               *, ask: bool = False, serving: bool = False) -> None:
    """Create a vault and its first administrator; hand over the one-time secrets.

    The secrets always go to a private file (``write_first_run_secrets``) and are shown
    only when stdout is a terminal: under nohup, systemd or a pipe, stdout ends up in a
    log, which must never hold the recovery code or a password. Then only the file's path
    is printed.
    """
    name = _admin_name(admin, ask)
    code = create(root, key_file=key_file, ae_title=ae_title)
    password, https_port, key_path = _first_admin(root, key_file, name)
    path = write_first_run_secrets(key_path, root, code, name, password, https_port)
    say(f"Created a vault in {root.absolute()} (key file {key_path.absolute()}: keep a copy "
        "apart from the data).")
    say(f"Open https://{socket.gethostname()}:{https_port}/ in a browser; install "
        f"{root.absolute() / 'tls' / 'ca.crt'} on the practice's computers so they trust it.")
    if sys.stdout.isatty():
        say("RECOVERY CODE (write it down and keep it away from this server).")
        say("It restores the master key if the key file is lost:")
        print(code, flush=True)
        say(f"FIRST ADMINISTRATOR: user '{name}', password below. Sign in at "
            f"https://<this server>:{https_port}/ and set up the second factor; then create "
            "one account per person with 'pacsvault user add'.")
        print(f"{name} password: {password}", flush=True)
        say(f"Both are also in {path} (readable by you only): delete that file once the "
            "recovery code is written down and you have signed in.")
    else:
        say("The one-time secrets (recovery code, first administrator's name and password) "
            "are not shown here, as this output may be kept in a log. They were written to "
            f"{path}, readable by you only. Read it, write the recovery code down on paper, "
            f"sign in at https://<this server>:{https_port}/, then delete the file "
            f"(shred -u {path}).")
        print(path, flush=True)
    if not serving:
        say("Next: register your modality with 'pacsvault node add AE_TITLE --host ADDRESS', "
            "then 'pacsvault serve'.")


def _first_admin(root: Path, key_file: Path | None, name: str) -> tuple[str, int, Path]:
    """Create the first admin account with a random password: (password, HTTPS port, key
    file path)."""
    vault = Vault.open(root, key_file)
    try:
        # A new vault's trail starts empty (its first record is what the practice does
        # next), so the account's creation is not recorded as an event.
        vault.recorder = Recorder([])
        _info, password = vault.accounts.first_admin(name, by="init")
        https_port = vault.settings.web.https_port
        key_path = resolve_key_path(vault.layout, vault.settings, key_file)
    finally:
        vault.close()
    return password, https_port, key_path


def cmd_init(args: argparse.Namespace) -> int:
    init_vault(data_dir(args), args.key_file, args.ae_title, args.admin, ask=True)
    return 0


def _running(state_path: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(state_path.read_text("utf-8"))
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return state


_SEALED_ADVICE = ("SEALED: images from registered devices are received and kept encrypted; "
                  "queries, retrievals and the web pages are refused until an "
                  "administrator runs 'pacsvault unseal' (or opens /unseal on the HTTPS port)")


def _sealed_status(args: argparse.Namespace, reason: str) -> int | None:
    """``status`` while the server runs sealed and this command has no key either: report
    the server (what the IT provider asks first), not an error about the key file."""
    from pacsvault.vault import Layout

    state = _running(Layout(data_dir(args)).state)
    if not state or not state.get("sealed"):
        return None
    if args.json:
        json.dump({"data": str(data_dir(args)), "server": {"running": True, **state},
                   "sealed": True, "key": reason}, sys.stdout, indent=2)
        print()
        return 1
    print(f"Vault        {data_dir(args)}")
    print(f"Server       running, pid {state['pid']}; DICOM plain port "
          f"{state.get('dicom_port') or 'off'}, DICOM TLS port "
          f"{state.get('dicom_tls_port') or 'off'}, HTTPS port {state.get('https_port') or 'off'}")
    print(f"Server       {_SEALED_ADVICE}")
    print(f"Master key   {reason}")
    return 1


def cmd_status(args: argparse.Namespace) -> int:
    from pacsvault.backup.health import backup_health, status_lines
    from pacsvault.crypto.keys import KeyUnavailable

    try:
        vault = open_vault(args)
    except KeyUnavailable as exc:
        code = _sealed_status(args, str(exc))
        if code is None:
            raise
        return code
    try:
        settings = vault.settings
        backups = backup_health(vault.layout, settings.backup)
        state = _running(vault.layout.state)
        counts = stats.counts(vault.sessions)  # without the archive's pydicom
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
                "https_port": settings.web.https_port if settings.web.enabled else None,
            },
            "nodes": [
                {"ae_title": n.ae_title, "host": n.host, "port": n.port, "tls": n.tls,
                 "client_cert": n.client_cert, "roles": list(n.roles)}
                for n in vault.nodes.all()
            ],
            # per-node downgrades to the retired AES TLS profile (issue 13, defect 7)
            "legacy_tls_nodes": [
                {"ae_title": n.ae_title, "host": n.host}
                for n in vault.nodes.all() if n.legacy_tls
            ],
            "counts": {k: v for k, v in counts.items() if k != "bytes"},
            "storage": {"received_bytes": counts["bytes"], "encrypted_bytes": on_disk},
            "certificate_expires": certificate_expiry(
                vault.layout.tls.server_cert
            ).isoformat(timespec="seconds"),
            "ca_name_constraints": ca_is_name_constrained(vault.layout.tls),
            # how the master key is held and where (issue 14, key protection)
            "key": key_summary(vault),
            # last good backup, drill and next run per target (issue 14, backups)
            "backup": backups.as_dict(),
        }
        backup_text = status_lines(backups)
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
              f"{srv.get('dicom_port') or 'off'}, DICOM TLS port {srv.get('dicom_tls_port')}, "
              f"HTTPS port {srv.get('https_port') or 'off'}")
        if srv.get("sealed"):  # the key is back here, but nobody has unsealed yet
            print(f"Server       {_SEALED_ADVICE}")
    else:
        print(f"Server       not running (configured: plain {conf['dicom_port'] or 'off'}, "
              f"TLS {conf['dicom_tls_port']}, HTTPS {conf['https_port'] or 'off'} on "
              f"{conf['bind']})")
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
    if not report["ca_name_constraints"]:
        # Made before issue 11: the CA installed on the practice PCs could vouch for any
        # name if its key were stolen (see ARCHITECTURE.md, TLS).
        print("Warning      CA without name constraints (vault made before they existed): "
              "it can sign certificates for any name")
    for n in report["legacy_tls_nodes"]:
        print(f"Warning      node {n['ae_title']} may use the retired AES TLS profile "
              f"(TLS_RSA_WITH_AES_128_CBC_SHA, no forward secrecy) from {n['host']}")
    key = report["key"]
    print(f"Master key   {key['protection']}, {key['key_file']}")
    for warning in key["warnings"]:
        print(f"Warning      {warning}")
    for line in backup_text:
        print(line)
    return 1 if srv.get("sealed") else 0


def key_summary(vault: Vault) -> dict[str, Any]:
    """``keys status`` in short: protection kind, file, same filesystem as the data."""
    from pacsvault.crypto.protection import describe

    path = vault.key_path if vault.key_path is not None else Path("?")
    found = describe(path, vault.layout.root)
    return {k: found[k] for k in ("protection", "key_file", "same_filesystem",
                                  "in_data_backup", "warnings")}


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"
