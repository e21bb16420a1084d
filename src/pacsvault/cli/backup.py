"""``pacsvault backup init|run|list|verify|prune|restore``.

Progress goes to stderr one line per target; results name targets, snapshot ids, counts
and sizes only (never a patient, never a secret). The recovery code is read at a terminal
or from a 0600 file, never from argv.
"""

from __future__ import annotations

import argparse
import getpass
import stat
import sys
from pathlib import Path
from typing import Any

from pacsvault.cli.common import CommandError, add_data_args, open_vault, say


def register(sub: Any) -> None:
    backup = sub.add_parser("backup", help="encrypted backups (restic) and restore")
    bsub = backup.add_subparsers(dest="backup_command", required=True, metavar="ACTION")

    p = bsub.add_parser("init", help="create the configured repositories (once per target)")
    add_data_args(p)
    p.add_argument("--target", default=None, help="one target (default: all)")
    p.add_argument("--recovery-code-file", type=Path, default=None,
                   help="0600 file holding the recovery code (asked once for vaults made "
                   "before backups existed; default: asked at the terminal)")
    p.set_defaults(func=cmd_init)

    p = bsub.add_parser("run", help="back up now")
    add_data_args(p)
    p.add_argument("--target", default=None, help="one target (default: all)")
    p.set_defaults(func=cmd_run)

    p = bsub.add_parser("list", help="snapshots of a target")
    add_data_args(p)
    p.add_argument("--target", default=None, help="one target (default: all)")
    p.set_defaults(func=cmd_list)

    p = bsub.add_parser("verify", help="check a repository (every pack read back)")
    add_data_args(p)
    p.add_argument("--target", default=None, help="one target (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="check the structure only, without reading every pack")
    p.set_defaults(func=cmd_verify)

    p = bsub.add_parser("prune", help="apply the retention settings and free space")
    add_data_args(p)
    p.add_argument("--target", default=None, help="one target (default: all)")
    p.set_defaults(func=cmd_prune)

    p = bsub.add_parser(
        "restore", help="restore a backup into a new, empty data directory (new machine: "
        "only the repository, its credentials and the recovery code are needed)")
    p.add_argument("--repository", required=True,
                   help="restic repository (path, sftp:..., s3:..., rest:...)")
    p.add_argument("--credentials-file", type=Path, default=None,
                   help="0600 file of KEY=VALUE lines for the repository (S3, SFTP...)")
    p.add_argument("--to", type=Path, required=True, help="new, empty data directory")
    p.add_argument("--key-file", type=Path, default=None,
                   help="where to write the master key file (default: the usual place)")
    p.add_argument("--snapshot", default="latest", help="data snapshot id (default: latest)")
    p.add_argument("--recovery-code-file", type=Path, default=None,
                   help="0600 file holding the recovery code (default: asked at the terminal)")
    p.add_argument("--to-index", default=None, metavar="URL",
                   help="a backup of a PostgreSQL index: the new, empty database to restore "
                   "it into (postgresql://USER@HOST:PORT/DB?sslmode=verify-full...; no "
                   "password in it)")
    p.add_argument("--to-index-password-file", type=Path, default=None,
                   help="0600 file holding that database's password (default: libpq's "
                   "pgpass / service)")
    p.add_argument("--pg-bin-dir", default="",
                   help="directory of pg_restore (default: the PATH)")
    p.set_defaults(func=cmd_restore)

    from pacsvault.cli import backup_drill  # backup drill (backup operations)

    backup_drill.register(bsub)


def _forget_erased(to: Path, key_file: Path) -> int:
    """An older data snapshot still holds the rows of patients erased since; the latest
    keystore has no key for them. Remove those rows now, so a restored archive never shows
    an erased patient again (``Eraser.forget_shredded``, audited)."""
    from pacsvault.storage.erasure import Eraser
    from pacsvault.vault import Vault

    vault = Vault.open(to, key_file)
    try:
        return Eraser(vault).forget_shredded(actor="restore")
    finally:
        vault.close()


def _index_target(url: str | None, password_file: Path | None) -> Any:
    """``--to-index``: the settings of the database a PostgreSQL backup is restored into
    (checked as ``[index]`` is: no password in the url)."""
    if url is None:
        if password_file is not None:
            raise CommandError("--to-index-password-file goes with --to-index")
        return None
    from pydantic import ValidationError

    from pacsvault.config.index import IndexSettings

    try:
        return IndexSettings(url=url, password_file=str(password_file.absolute())
                             if password_file else "")
    except ValidationError as exc:
        errors = exc.errors()
        raise CommandError(str(errors[0].get("msg", "invalid --to-index")) if errors
                           else "invalid --to-index") from None


def _recovery_code(path: Path | None) -> str:
    if path is not None:
        try:
            mode = path.stat().st_mode
        except OSError:
            raise CommandError(f"cannot read {path}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CommandError(f"{path} is readable by other users; run: chmod 600 {path}")
        lines = path.read_text("utf-8").splitlines()
        code = next((ln.strip() for ln in lines if ln.strip()), "")
    elif sys.stdin.isatty():
        code = getpass.getpass("Recovery code: ").strip()
    else:
        raise CommandError("no recovery code: run at a terminal or give --recovery-code-file "
                           "FILE (mode 0600); never on the command line")
    if not code:
        raise CommandError("no recovery code given")
    return code


def _targets(vault: Any, wanted: str | None) -> list[str]:
    names = [t.name for t in vault.settings.backup.targets]
    if not names:
        raise CommandError("no backup target is configured: add one under [backup] in "
                           "pacsvault.toml (see the commented example)")
    if wanted is not None:
        if wanted not in names:
            raise CommandError(f"no backup target named {wanted!r} (configured: "
                               f"{', '.join(names)})")
        return [wanted]
    return names


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def cmd_init(args: argparse.Namespace) -> int:
    from pacsvault.backup import runner

    vault = open_vault(args)
    try:
        names = _targets(vault, args.target)
        if not runner.has_recovery_password(vault):
            say("This vault predates backups: its recovery code is needed once, to give the "
                "repositories a key that opens them with the recovery code alone.")
            try:
                runner.set_recovery_code(vault, _recovery_code(args.recovery_code_file))
            except runner.BackupError as exc:
                raise CommandError(str(exc)) from None
        failed = 0
        for name in names:
            say(f"{name}: preparing the repository...")
            try:
                say(runner.init(vault, name))
            except runner.BackupError as exc:
                say(f"{name}: FAILED: {exc}")
                failed += 1
        if failed:
            raise CommandError(f"{failed} target(s) could not be prepared")
        return 0
    finally:
        vault.close()


def cmd_run(args: argparse.Namespace) -> int:
    from pacsvault.backup import runner

    vault = open_vault(args)
    try:
        names = _targets(vault, args.target)
        say(f"Backing up to {', '.join(names)}...")
        try:
            outcomes = runner.run_backup(vault, names)
        except runner.BackupError as exc:
            raise CommandError(str(exc)) from None
        failed = 0
        for o in outcomes:
            if o.ok:
                print(f"{o.target}: snapshot {o.snapshot}, {o.files} files, "
                      f"{_size(o.bytes_added)} added, {o.seconds:.1f} s")
            else:
                failed += 1
                print(f"{o.target}: FAILED: {o.error}")
        if failed:
            raise CommandError(f"the backup failed for {failed} target(s)")
        return 0
    finally:
        vault.close()


def cmd_list(args: argparse.Namespace) -> int:
    from pacsvault.backup import runner

    vault = open_vault(args)
    try:
        for name in _targets(vault, args.target):
            try:
                snapshots = runner.list_snapshots(vault, name)
            except runner.BackupError as exc:
                raise CommandError(str(exc)) from None
            print(f"{name}:")
            for s in snapshots:
                print(f"  {s.id}  {s.time[:19].replace('T', ' ')} UTC  {s.kind}")
            if not snapshots:
                print("  (no snapshot)")
        return 0
    finally:
        vault.close()


def cmd_verify(args: argparse.Namespace) -> int:
    from pacsvault.backup import runner

    vault = open_vault(args)
    try:
        failed = 0
        for name in _targets(vault, args.target):
            say(f"{name}: checking the repository"
                f"{'' if args.quick else ' and reading back every pack'}...")
            o = runner.verify(vault, name, read_data=not args.quick)
            if o.ok:
                print(f"{name}: OK ({o.seconds:.1f} s)")
            else:
                failed += 1
                print(f"{name}: DAMAGED: {o.error}")
        if failed:
            raise CommandError(f"{failed} backup repository(ies) failed verification")
        return 0
    finally:
        vault.close()


def cmd_prune(args: argparse.Namespace) -> int:
    from pacsvault.backup import runner

    vault = open_vault(args)
    try:
        failed = 0
        for name in _targets(vault, args.target):
            o = runner.prune(vault, name)
            print(f"{name}: {'pruned' if o.ok else 'FAILED: ' + str(o.error)}")
            failed += 0 if o.ok else 1
        if failed:
            raise CommandError(f"pruning failed for {failed} target(s)")
        return 0
    finally:
        vault.close()


def cmd_restore(args: argparse.Namespace) -> int:
    from pacsvault.backup import runner
    from pacsvault.backup.restic import ResticError

    to: Path = args.to.absolute()
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise CommandError(f"{to} is not an empty directory; restore only into a new one")
    to_index = _index_target(args.to_index, args.to_index_password_file)
    code = _recovery_code(args.recovery_code_file)
    say(f"Restoring {args.snapshot} snapshot into {to}...")
    try:
        result = runner.restore(args.repository, args.credentials_file, code, to,
                                args.key_file, args.snapshot, to_index=to_index,
                                pg_bin_dir=args.pg_bin_dir)
    except (runner.BackupError, ResticError) as exc:
        raise CommandError(str(exc)) from None
    print(f"Restored snapshot {result.snapshot}: {result.instances} instances, "
          f"{result.keys_restored} patient keys.")
    if result.index_database:
        print(f"Index restored into the PostgreSQL database {result.index_database}.")
    if result.objects_were_in_bucket:
        print("The objects were in an S3 bucket: they are restored as local files under "
              f"{to / 'objects'} ([storage] url emptied); 'pacsvault migrate "
              "--to-storage s3://...' puts them into a bucket again.")
    if result.keys_absent:
        print(f"{result.keys_absent} patient key(s) were destroyed (erasure): their "
              "images stay unreadable, as intended.")
        forgotten = _forget_erased(to, result.key_file) if result.key_file else 0
        print(f"{forgotten} index row(s) of erased patients removed: their names and "
              "headers do not come back from an older snapshot.")
    if result.objects_missing:
        print(f"WARNING: {result.objects_missing} indexed object(s) are not in this snapshot "
              "(removed while the backup ran).")
    print(f"Master key written to {result.key_file} (mode 0600). Start with: pacsvault "
          f"serve --data {to}")
    return 0
