"""``pacsvault migrate``: copy a vault to the scale-out backends (PostgreSQL index, S3
objects) or back to the embedded ones, offline, resumable, verified object by object.

The work is ``pacsvault.migrate``; this module reads the command line and prints the
outcome. Secrets never go on the command line: the PostgreSQL password and the S3 keys are
named by their 0600 files (``--index-password-file``, ``--storage-credentials-file``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pacsvault.cli.common import (
    CommandError,
    add_data_args,
    data_dir,
    passphrase_source,
    say,
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "migrate",
        help="move the vault to a PostgreSQL index and/or S3 bucket, or back to the "
        "embedded index and local files (offline; resumable; verified)",
        description="Copy the index and the encrypted objects to other backends, verify "
        "every instance, then point the settings at them. Stop 'pacsvault serve' first. "
        "An interrupted run continues where it stopped when run again. The old index and "
        "objects are kept.",
    )
    add_data_args(p)
    p.add_argument("--to-index", metavar="URL", default=None,
                   help="postgresql://USER@HOST:PORT/DB?sslmode=verify-full&sslrootcert=… "
                   "(an empty database; no password in the url), or 'embedded'")
    p.add_argument("--index-password-file", metavar="FILE", default="",
                   help="0600 file whose first line is the PostgreSQL password (else "
                   "libpq's passfile/service/~/.pgpass)")
    p.add_argument("--to-storage", metavar="URL", default=None,
                   help="s3://BUCKET/PREFIX (an existing bucket), or 'local'")
    p.add_argument("--storage-endpoint", metavar="URL", default="",
                   help="the S3 endpoint, https://… (empty: AWS for the region)")
    p.add_argument("--storage-region", metavar="NAME", default="")
    p.add_argument("--storage-credentials-file", metavar="FILE", default="",
                   help="0600 file with access_key_id = … and secret_access_key = … "
                   "(else the standard AWS provider chain)")
    p.add_argument("--storage-ca-file", metavar="FILE", default="",
                   help="a private CA for the endpoint's certificate")
    p.add_argument("--storage-path-style", action="store_true", default=None,
                   help="address the bucket in the path (MinIO, SeaweedFS, Ceph by name)")
    p.add_argument("--dry-run", action="store_true",
                   help="say what would be copied, change nothing")
    p.add_argument("--restart", action="store_true",
                   help="forget an interrupted migration and start over (the index it "
                   "made in the target is removed first)")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--kill-in-table", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_migrate)


def _path(value: str) -> str:
    return str(Path(value).resolve()) if value else ""


def cmd_migrate(args: argparse.Namespace) -> int:
    from pacsvault import migrate
    from pacsvault.vault import Vault

    root = data_dir(args)

    def choose(vault: Vault) -> migrate.Target:
        try:
            return migrate.choose(
                vault.settings, to_index=args.to_index,
                index_password_file=_path(args.index_password_file),
                to_storage=args.to_storage, endpoint=args.storage_endpoint,
                region=args.storage_region,
                credentials_file=_path(args.storage_credentials_file),
                ca_file=_path(args.storage_ca_file), path_style=args.storage_path_style)
        except migrate.TargetError as exc:
            raise CommandError(str(exc)) from None

    from pacsvault.dicom import forward

    # The forward queue and its cursor live on forward's own metadata (made on first use):
    # named here, where the DICOM layer may be imported, so that they are carried too.
    options = migrate.Options(dry_run=bool(args.dry_run), restart=bool(args.restart),
                              stop_after=args.stop_after, kill_in_table=args.kill_in_table,
                              side_tables=tuple(forward.metadata.sorted_tables))
    try:
        summary = migrate.migrate(root, args.key_file, passphrase_source(args), choose,
                                  options)
    except migrate.MigrationError as exc:
        raise CommandError(str(exc)) from None
    except Exception as exc:
        from pacsvault.migrate.objects import CopyError
        from pacsvault.migrate.state import StateError
        from pacsvault.storage.backends import StorageConfigError
        from pacsvault.storage.objects import StorageUnavailable

        if isinstance(exc, CopyError | StateError | StorageConfigError | StorageUnavailable):
            raise CommandError(f"{exc}; run the same command again to continue") from None
        raise
    route = (f"index {summary.source_index} -> {summary.target_index}, objects "
             f"{summary.source_storage} -> {summary.target_storage}")
    if summary.dry_run:
        say(f"dry run: {route}")
        if summary.target_storage != summary.source_storage:
            say(f"  would copy {summary.objects} object(s), {summary.bytes} bytes, each "
                "read back and compared")
        if summary.rows:
            filled = ", ".join(f"{name} {count}" for name, count in summary.rows.items()
                               if count)
            say(f"  would copy {sum(summary.rows.values())} index row(s) in "
                f"{len(summary.rows)} tables ({filled or 'all empty'}), then verify every "
                "instance")
        say("nothing was changed")
        return 0
    say(f"migrated: {route}; {summary.verified} instance(s) verified identical"
        + (f" ({summary.erased} erased on purpose)" if summary.erased else "")
        + f", {sum(summary.rows.values())} index row(s) counted equal; the audit trail "
        "verifies. The settings file now names the new backends.")
    for note in summary.notes:
        say(f"note: {note}")
    sys.stdout.flush()
    return 0
