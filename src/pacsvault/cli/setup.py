"""``pacsvault init`` and ``pacsvault status``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import socket
import sys
from pathlib import Path
from typing import Any

from pacsvault.audit import Recorder
from pacsvault.cli import alertscmd
from pacsvault.cli.common import CommandError, add_data_args, data_dir, open_vault, say
from pacsvault.config import CONFIG_NAME, StorageSettings
from pacsvault.config.index import IndexSettings, IndexUrlError, check_url
from pacsvault.fsutil import private_dir, write_private_new
from pacsvault.vault import Vault, create, resolve_key_path


def register(sub: Any) -> None:
    p = sub.add_parser("init", help="create a new vault (keys, certificates, settings)")
    add_data_args(p)
    p.add_argument("--ae-title", default="PACSVAULT", help="this archive's AE title")
    p.add_argument("--admin", metavar="NAME",
                   help="name of the first administrator account (default: asked at a "
                   "terminal, else admin-<6 random characters>)")
    p.add_argument("--index-url", metavar="URL", default="",
                   help="a PostgreSQL index instead of the embedded one: "
                   "postgresql://USER@HOST:PORT/DB?sslmode=verify-full&sslrootcert=CA "
                   "(a new, empty database; never a password in the url)")
    p.add_argument("--index-password-file", metavar="FILE", type=Path,
                   help="0600 file holding the database password (default: libpq's "
                   "passfile, service or ~/.pgpass)")
    p.add_argument("--storage-url", metavar="URL", default="",
                   help="objects in an S3 bucket instead of the data directory: "
                   "s3://BUCKET/PREFIX (checked reachable before anything is made)")
    p.add_argument("--storage-endpoint", metavar="URL", default="",
                   help="the S3 endpoint, https://... (default: AWS in --storage-region)")
    p.add_argument("--storage-region", metavar="NAME", default="")
    p.add_argument("--storage-credentials-file", metavar="FILE", type=Path,
                   help="0600 file: access_key_id = ... / secret_access_key = ... "
                   "(default: the AWS provider chain)")
    p.add_argument("--storage-ca-file", metavar="FILE", type=Path,
                   help="the endpoint's CA certificate (TLS is always verified)")
    p.add_argument("--storage-path-style", action="store_true",
                   help="https://HOST/BUCKET/KEY addressing (MinIO, SeaweedFS, Ceph)")
    alertscmd.add_init_args(p)  # a person is always told (issue 19)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("status", help="listeners, nodes, counts and storage size")
    add_data_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)


SECRETS_SUFFIX = ".first-run-secrets.txt"
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
    """``fsutil.private_dir``, its refusal as a command error."""
    try:
        return private_dir(key_dir)
    except NotADirectoryError as exc:
        raise CommandError(str(exc)) from None


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
               *, ask: bool = False, serving: bool = False,
               index: IndexSettings | None = None,
               storage: StorageSettings | None = None,
               alerts: dict[str, str | int | bool | list[str]] | None = None) -> None:
    """Create a vault and its first administrator; hand over the one-time secrets.

    The secrets always go to a private file (``write_first_run_secrets``) and are shown
    only when stdout is a terminal: under nohup, systemd or a pipe, stdout ends up in a
    log, which must never hold the recovery code or a password. Then only the file's path
    is printed.

    ``alerts``: the ``[alerts]`` values chosen (issue 19); a test is sent at once, and the
    choice (none included) is the trail's first record.
    """
    name = _admin_name(admin, ask)
    code = create(root, key_file=key_file, ae_title=ae_title, index=index, storage=storage)
    try:
        if alerts:
            alertscmd.write_choice(root, alerts)
        password, https_port, key_path = _first_admin(root, key_file, name, alerts or {})
        path = write_first_run_secrets(key_path, root, code, name, password, https_port)
    except BaseException:
        # A vault nobody can sign in to, and (PostgreSQL) a database it keeps claimed, so
        # a retry would be refused: undo it all (vault.undo_create).
        if index is not None and index.is_postgres:
            from pacsvault.vault import undo_create

            undo_create(root, key_file)
        raise
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
    from pacsvault.cli.exposure import addresses_notice
    from pacsvault.config import load

    notice = addresses_notice(load(root).server.bind)
    if notice is not None:
        say(f"The server will be {notice}.")
    if not serving:
        say("Next: register your modality with 'pacsvault node add AE_TITLE --host ADDRESS', "
            "then 'pacsvault serve'.")


def _first_admin(root: Path, key_file: Path | None, name: str,
                 alerts: dict[str, str | int | bool | list[str]]) -> tuple[str, int, Path]:
    """Create the first admin account with a random password: (password, HTTPS port, key
    file path). Then the alert channel: tested when one was chosen, and the choice
    recorded (the trail's first record)."""
    vault = Vault.open(root, key_file)
    try:
        trail = vault.recorder
        # The account's creation is not recorded as an event: a new vault's trail starts
        # with what the practice decided (its alert channel) and then does.
        vault.recorder = Recorder([])
        _info, password = vault.accounts.first_admin(name, by="init")
        https_port = vault.settings.web.https_port
        key_path = resolve_key_path(vault.layout, vault.settings, key_file)
        delivered: list[str] = []
        if alerts:
            delivered, errors = alertscmd.send_test(root, vault.settings.alerts, trail, "init")
            for channel in delivered:
                say(f"A test alert was sent by {channel}: check that it arrived.")
            for error in errors:
                say(f"The test alert failed ({error}); fix [alerts] in {CONFIG_NAME}, then "
                    "run 'pacsvault alerts test'.")
        else:
            say("No alert channel: security alerts will only be recorded in the audit trail "
                "and shown on the Health page. This choice is recorded and stays a finding "
                "of 'pacsvault check' until you set [alerts] mail_to/smtp_host or "
                "webhook_url and run 'pacsvault alerts test'.")
        trail.emit(alertscmd.choice_event(alerts, delivered, "init"))
    finally:
        vault.close()
    return password, https_port, key_path


def index_choice(url: str, password_file: Path | None) -> IndexSettings | None:
    """``--index-url``/``--index-password-file`` as settings (None: the embedded index);
    a url holding a password is refused before anything is made (the message never
    repeats the url)."""
    if not url:
        if password_file is not None:
            raise CommandError("--index-password-file goes with --index-url")
        return None
    try:
        check_url(url)
        return IndexSettings(url=url, password_file=str(password_file.resolve())
                             if password_file is not None else "")
    except IndexUrlError as exc:
        raise CommandError(str(exc)) from None


def storage_choice(args: argparse.Namespace) -> StorageSettings | None:
    """``--storage-*`` as settings (None: local object files, the default)."""
    from pydantic import ValidationError

    if not args.storage_url:
        if args.storage_endpoint or args.storage_credentials_file or args.storage_ca_file:
            raise CommandError("the --storage-* options go with --storage-url")
        return None
    try:
        return StorageSettings(
            url=args.storage_url, endpoint=args.storage_endpoint, region=args.storage_region,
            credentials_file=str(args.storage_credentials_file.resolve())
            if args.storage_credentials_file else "",
            ca_file=str(args.storage_ca_file.resolve()) if args.storage_ca_file else "",
            path_style=args.storage_path_style)
    except ValidationError:
        raise CommandError("--storage-url must look like s3://bucket/prefix") from None


def cmd_init(args: argparse.Namespace) -> int:
    index = index_choice(args.index_url, args.index_password_file)
    storage = storage_choice(args)
    alerts = alertscmd.chosen_values(args, ask=True)
    init_vault(data_dir(args), args.key_file, args.ae_title, args.admin, ask=True,
               index=index, storage=storage, alerts=alerts)
    return 0


def _sealed_status(args: argparse.Namespace, reason: str) -> int | None:
    """``status`` while the server runs sealed and this command has no key either: report
    the server (what the IT provider asks first), not an error about the key file."""
    from pacsvault.status import running_state
    from pacsvault.status.text import sealed_json, sealed_lines
    from pacsvault.vault import Layout

    state = running_state(Layout(data_dir(args)))
    if not state or not state.get("sealed"):
        return None
    if args.json:
        json.dump(sealed_json(str(data_dir(args)), state, reason), sys.stdout, indent=2)
        print()
        return 1
    for line in sealed_lines(str(data_dir(args)), state, reason):
        print(line)
    return 1


def _unreachable_status(args: argparse.Namespace, reason: str) -> int | None:
    """``status`` when a PostgreSQL index does not answer: the report without the index
    (its red line, the objects), exit 1; None for an embedded index (its error stands)."""
    from pacsvault import config, vaultfile
    from pacsvault.status import read_server_state
    from pacsvault.status.deployment import unopened
    from pacsvault.status.report import server_alive
    from pacsvault.status.text import unopened_json, unopened_lines
    from pacsvault.vault import Layout

    root = data_dir(args)
    try:
        settings = config.load(root)
    except Exception:  # the settings are the problem: the open's own error says it
        return None
    if not settings.index.is_postgres:
        return None
    layout = Layout(root)
    try:
        instance = vaultfile.instance(layout.meta)
    except Exception:
        instance = "main"
    state = read_server_state(layout)
    alive = bool(state) and server_alive(state)
    deployed = unopened(settings, root, instance, reason)
    if args.json:
        json.dump(unopened_json(str(root), state, alive, deployed), sys.stdout, indent=2)
        print()
    else:
        for line in unopened_lines(str(root), state, alive, deployed):
            print(line)
    return 1


def cmd_status(args: argparse.Namespace) -> int:
    """The report ``pacsvault.status`` gathers (the Health page shows the same one).
    Exit 1 when the server is sealed or the index or object store does not answer (the
    report's red lines), else 0."""
    from pacsvault.crypto.keys import KeyUnavailable
    from pacsvault.index.postgres import IndexUnreachable
    from pacsvault.status import gather
    from pacsvault.status.text import as_json, lines

    try:
        vault = open_vault(args)
    except KeyUnavailable as exc:
        code = _sealed_status(args, str(exc))
        if code is None:
            raise
        return code
    except IndexUnreachable as exc:
        code = _unreachable_status(args, str(exc))
        if code is None:
            raise
        return code
    try:
        report = gather(vault, measure_objects=True)
    finally:
        vault.close()
    down = report.deployment is not None and (
        not report.deployment.index.reachable or report.deployment.objects.reachable is False)
    if args.json:
        json.dump(as_json(report), sys.stdout, indent=2)
        print()
        return 1 if down else 0
    for line in lines(report):
        print(line)
    return 1 if report.sealed or down else 0
