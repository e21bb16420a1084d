"""How the master key is held on disk: a 0600 file, a passphrase, or the machine.

Three protections of the same key file (the path never changes, only its contents):

* ``file`` — ``pacsvault-master-key/v1``: the key in base64 in a 0600 file (the original
  format, still read and written). Whoever reads the file has the vault.
* ``passphrase`` — ``pacsvault-master-key/v2``: the key sealed with AES-256-GCM under
  Argon2id(passphrase, salt) with memory-hard parameters recorded in the file; the vault id
  and the parameters are the AEAD's associated data (a file moved to another vault or with
  weakened parameters does not open). A stolen disk or backup carrying the file is useless
  without the passphrase; the price is that someone must type it after each start.
* ``machine`` — the ``pacsvault-master-key/v1`` text sealed by ``systemd-creds encrypt``
  (credential name ``pacsvault-master-key``) with the TPM2 where there is one, else the
  host key ``/var/lib/systemd/credential.secret``. The file *is* the credential, so the
  unit can hand it to the service with ``LoadCredentialEncrypted=`` (the service user
  cannot read the host key itself). It opens on this machine only: a disk carried away
  opens nothing, and the server still starts unattended after a power cut.

Every (re)protection writes a new file beside the old one (0600 from its creation, same
owner), fsyncs it, renames it over the old one and fsyncs the directory: the key is never
in clear in a file that is not the key file, and a crash leaves the old or the new file.
The filesystem may still hold the blocks of an older clear file (SSDs, journaling):
protect the key when the vault is created, or move the vault to a fresh medium.

One loading path for everything: :func:`load_master`. ``KeyUnavailable`` means "not now"
(medium missing, no passphrase at hand, machine credential not usable here): ``serve``
starts sealed on it. ``VaultKeyError`` means "wrong": a wrong passphrase, a foreign file.
"""

from __future__ import annotations

import base64
import getpass
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pacsvault.crypto.keys import (
    KEY_FILE_HEADER,
    KeyUnavailable,
    MasterKey,
    VaultKeyError,
    check_key_file,
)
from pacsvault.fsutil import PrivateFileError, fsync_dir, read_private_text, write_durably

KEY_FILE_HEADER_V2 = "pacsvault-master-key/v2"
FILE = "file"
PASSPHRASE = "passphrase"  # noqa: S105 (a kind, not a secret)
MACHINE = "machine"
KINDS = (FILE, PASSPHRASE, MACHINE)

# Argon2id: 3 passes over 64 MiB, one lane (~0.2 s measured on the 2-core test machine).
ARGON2_TIME = 3
ARGON2_MEMORY_KIB = 64 * 1024
ARGON2_PARALLELISM = 1
# Files with weaker parameters than these are refused (a tampered file could otherwise
# make an attacker's guesses cheap before the passphrase is typed into it).
_MIN_TIME, _MIN_MEMORY_KIB = 2, 19 * 1024

CREDENTIAL_NAME = "pacsvault-master-key"  # systemd credential of a machine-held key
# LoadCredential= name of the passphrase (a name, not a secret)
PASSPHRASE_CREDENTIAL = "pacsvault-passphrase"  # noqa: S105
SYSTEMD_CREDS_ENV = "PACSVAULT_SYSTEMD_CREDS"  # another systemd-creds binary (tests)
_CREDS_TIMEOUT = 60

PassphraseProvider = Callable[[], str | None]


@dataclass(frozen=True)
class KdfParams:
    time_cost: int = ARGON2_TIME
    memory_kib: int = ARGON2_MEMORY_KIB
    parallelism: int = ARGON2_PARALLELISM

    @property
    def label(self) -> str:
        return f"argon2id-t{self.time_cost}-m{self.memory_kib}-p{self.parallelism}"


# --- reading -------------------------------------------------------------------------------


def _read_private(path: Path) -> str:
    """The key file's text, refusing one that other users can read (as since v1)."""
    try:
        check_key_file(path)
        return path.read_text("ascii", errors="replace")
    except PermissionError:
        raise KeyUnavailable(f"key file {path} cannot be read by this user") from None


def kind_of_text(text: str) -> str:
    first = text.split("\n", 1)[0].strip()
    if first == KEY_FILE_HEADER:
        return FILE
    if first == KEY_FILE_HEADER_V2:
        return PASSPHRASE
    if text.strip() and _is_credential(text):
        return MACHINE
    return "unknown"


def _is_credential(text: str) -> bool:
    try:
        blob = base64.b64decode("".join(text.split()), validate=True)
    except ValueError:
        return False
    return len(blob) > 64  # systemd's header alone is longer (id, sizes, IV, tag)


def protection_of(path: Path) -> str:
    """``file``, ``passphrase``, ``machine`` (or ``unknown``); KeyUnavailable when absent."""
    return kind_of_text(_read_private(path))


def _fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        name, _, value = line.partition("=")
        fields[name.strip()] = value.strip()
    return fields


def _parse_plain(text: str, where: str) -> tuple[MasterKey, str]:
    if kind_of_text(text) != FILE:
        raise VaultKeyError(f"{where} is not a pacsvault key file")
    fields = _fields(text)
    try:
        raw = base64.b64decode(fields["key"], validate=True)
        return MasterKey(raw), fields["vault"]
    except (KeyError, ValueError, VaultKeyError):
        raise VaultKeyError(f"{where} is damaged: it holds no valid master key") from None


def _foreign(path: Path) -> VaultKeyError:
    return VaultKeyError(
        f"the key file {path} does not open this vault (it belongs to another vault or is "
        "damaged); nothing was changed")


def load_master(
    key_path: Path, vault_id: str, passphrase: PassphraseProvider | None = None
) -> MasterKey:
    """The master key of ``vault_id`` from its key file, whatever its protection.

    ``passphrase`` is asked only when the file needs one (a prompt is not shown for a plain
    file). Raises ``KeyUnavailable`` when the key cannot be had now (file absent, no
    passphrase available, machine credential unusable here) and ``VaultKeyError`` when
    what was given is wrong. The caller still checks the vault's key check.
    """
    text = _read_private(key_path)
    kind = kind_of_text(text)
    if kind == FILE:
        master, owner = _parse_plain(text, str(key_path))
    elif kind == PASSPHRASE:
        fields = _fields(text)
        owner = fields.get("vault", "")
        if not secrets.compare_digest(owner.encode(), vault_id.encode()):
            raise _foreign(key_path)
        given = passphrase() if passphrase is not None else None
        if given is None:
            raise KeyUnavailable(
                f"the master key {key_path} is protected by a passphrase and none is "
                "available (no terminal to ask it, no --passphrase-file, no "
                f"$CREDENTIALS_DIRECTORY/{PASSPHRASE_CREDENTIAL})")
        master = _open_sealed(fields, given, vault_id, key_path)
    elif kind == MACHINE:
        master, owner = _parse_plain(_machine_plaintext(key_path, text), str(key_path))
    else:
        raise VaultKeyError(f"{key_path} is not a pacsvault key file")
    if not secrets.compare_digest(owner.encode(), vault_id.encode()):
        raise _foreign(key_path)
    return master


def unlock(key_path: Path, vault_id: str, passphrase: str) -> MasterKey:
    """The master key with a passphrase in hand (unsealing a running server)."""
    return load_master(key_path, vault_id, lambda: passphrase)


# --- passphrase ----------------------------------------------------------------------------


def _kdf(passphrase: str, salt: bytes, params: KdfParams) -> bytes:
    from argon2.low_level import Type, hash_secret_raw  # only when a passphrase is in play

    # NFKC as for account passwords: the same phrase typed on another keyboard opens it.
    return hash_secret_raw(
        unicodedata.normalize("NFKC", passphrase).encode("utf-8"), salt, time_cost=params.time_cost,
        memory_cost=params.memory_kib, parallelism=params.parallelism, hash_len=32,
        type=Type.ID)


def _aad(vault_id: str, params: KdfParams, salt_b64: str) -> bytes:
    return (f"{KEY_FILE_HEADER_V2}\nvault={vault_id}\nkdf={params.label}\n"
            f"salt={salt_b64}\n").encode("ascii")


def _params_of(fields: dict[str, str], path: Path) -> KdfParams:
    try:
        name, t, m, p = fields["kdf"].split("-")
        if name != "argon2id" or t[0] != "t" or m[0] != "m" or p[0] != "p":
            raise ValueError(name)
        params = KdfParams(int(t[1:]), int(m[1:]), int(p[1:]))
    except (KeyError, ValueError, IndexError):
        raise VaultKeyError(f"{path} is damaged: unknown key derivation") from None
    if params.time_cost < _MIN_TIME or params.memory_kib < _MIN_MEMORY_KIB \
            or not 1 <= params.parallelism <= 16 or params.memory_kib > 4 * 1024 * 1024 \
            or params.time_cost > 100:
        raise VaultKeyError(f"{path} has key derivation parameters out of bounds; refused")
    return params


def _open_sealed(fields: dict[str, str], passphrase: str, vault_id: str,
                 path: Path) -> MasterKey:
    params = _params_of(fields, path)
    try:
        salt_b64 = fields["salt"]
        salt = base64.b64decode(salt_b64, validate=True)
        sealed = base64.b64decode(fields["sealed"], validate=True)
    except (KeyError, ValueError):
        raise VaultKeyError(f"{path} is damaged: it holds no sealed master key") from None
    try:
        # The AEAD tag is the only check: no early exit on a partial match.
        raw = AESGCM(_kdf(passphrase, salt, params)).decrypt(
            sealed[:12], sealed[12:], _aad(vault_id, params, salt_b64))
    except InvalidTag:
        raise VaultKeyError(
            f"the passphrase does not open the master key {path}; nothing was changed"
        ) from None
    return MasterKey(raw)


def _passphrase_body(master: MasterKey, vault_id: str, passphrase: str,
                     params: KdfParams) -> bytes:
    salt = secrets.token_bytes(16)
    salt_b64 = base64.b64encode(salt).decode()
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(_kdf(passphrase, salt, params)).encrypt(
        nonce, master.raw, _aad(vault_id, params, salt_b64))
    return (f"{KEY_FILE_HEADER_V2}\nvault={vault_id}\nprotection=passphrase\n"
            f"kdf={params.label}\nsalt={salt_b64}\n"
            f"sealed={base64.b64encode(nonce + sealed).decode()}\n").encode("ascii")


# --- machine (systemd-creds) ---------------------------------------------------------------


@dataclass(frozen=True)
class MachineSupport:
    ok: bool
    with_key: str  # "tpm2" or "host" when ok
    reason: str  # why not, user-facing


def _creds_binary() -> str | None:
    return os.environ.get(SYSTEMD_CREDS_ENV) or shutil.which("systemd-creds")


def _creds(args: list[str], data: bytes) -> subprocess.CompletedProcess[bytes]:
    binary = _creds_binary()
    if binary is None:
        raise KeyUnavailable("systemd-creds is not installed on this machine")
    try:
        return subprocess.run([binary, *args], input=data, capture_output=True,
                              timeout=_CREDS_TIMEOUT, check=False)
    except OSError as exc:
        raise KeyUnavailable(f"systemd-creds cannot run here: {exc.strerror}") from None
    except subprocess.TimeoutExpired:
        raise KeyUnavailable("systemd-creds did not answer") from None


def _creds_error(done: subprocess.CompletedProcess[bytes]) -> str:
    lines = [ln for ln in done.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else f"exit status {done.returncode}"


def machine_support() -> MachineSupport:
    """Can this machine seal a credential now? Tried for real (a throw-away secret sealed
    and opened): systemd-creds needs root to read or create the host key, and a TPM2 device
    for ``tpm2``."""
    if _creds_binary() is None:
        return MachineSupport(False, "", "systemd-creds is not installed on this machine "
                              "(Debian package systemd, version 250 or later)")
    try:
        tpm = _creds(["has-tpm2", "--quiet"], b"").returncode == 0
        with_key = "tpm2" if tpm else "host"
        probe = secrets.token_bytes(16)
        sealed = _creds(["encrypt", "--name=pacsvault-probe", f"--with-key={with_key}",
                         "-", "-"], probe)
        if sealed.returncode != 0:
            return MachineSupport(False, "", "systemd-creds cannot seal a credential here "
                                  f"({_creds_error(sealed)}); run as root")
        opened = _creds(["decrypt", "--name=pacsvault-probe", "-", "-"], sealed.stdout)
    except KeyUnavailable as exc:
        return MachineSupport(False, "", str(exc))
    if opened.returncode != 0 or not secrets.compare_digest(opened.stdout, probe):
        return MachineSupport(False, "", "systemd-creds cannot open what it sealed here "
                              f"({_creds_error(opened)})")
    return MachineSupport(True, with_key, "")


def _machine_body(master: MasterKey, vault_id: str) -> bytes:
    support = machine_support()
    if not support.ok:
        raise VaultKeyError(f"machine protection is not available: {support.reason}")
    done = _creds(["encrypt", f"--name={CREDENTIAL_NAME}", f"--with-key={support.with_key}",
                   "-", "-"], _plain_body(master, vault_id))
    if done.returncode != 0:
        raise VaultKeyError(f"systemd-creds could not seal the key: {_creds_error(done)}")
    return done.stdout


def _machine_plaintext(path: Path, text: str) -> str:
    """The v1 text inside a machine credential: systemd's own copy when the unit loaded it
    (``LoadCredentialEncrypted=pacsvault-master-key:KEYFILE``), else systemd-creds."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        loaded = Path(directory) / CREDENTIAL_NAME
        if loaded.is_file():
            return _read_private(loaded)
    try:
        done = _creds(["decrypt", f"--name={CREDENTIAL_NAME}", "-", "-"],
                      text.encode("ascii"))
    except KeyUnavailable as exc:
        raise KeyUnavailable(f"the master key {path} is sealed to a machine and cannot be "
                             f"opened here: {exc}") from None
    if done.returncode != 0:
        raise KeyUnavailable(
            f"the master key {path} is sealed to a machine and cannot be opened here "
            f"({_creds_error(done)}); run as root on the machine that sealed it, or give "
            f"the service LoadCredentialEncrypted={CREDENTIAL_NAME}:{path}")
    return done.stdout.decode("ascii", "replace")


# --- writing -------------------------------------------------------------------------------


def _plain_body(master: MasterKey, vault_id: str) -> bytes:
    return (f"{KEY_FILE_HEADER}\nvault={vault_id}\n"
            f"key={base64.b64encode(master.raw).decode()}\n").encode("ascii")



def write_atomic(path: Path, body: bytes) -> None:
    """Replace ``path`` by ``body``: 0600 from creation (keeping the old file's owner when
    root rewrites a service's key), fsync, rename, directory fsync."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        old = path.stat()
    except FileNotFoundError:
        old = None
    # A rewrite cut by a crash left its temporary file: it holds the key (protected, or
    # in clear after an unprotect), so it must not linger beside the key file.
    for stale in directory.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            if old is not None and os.geteuid() == 0:
                os.fchown(fd, old.st_uid, old.st_gid)
            write_durably(fd, [body])
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)


def protect_with_passphrase(key_path: Path, master: MasterKey, vault_id: str,
                            passphrase: str, params: KdfParams | None = None) -> None:
    """Seal the key file under a passphrase (a passphrase change too). The caller has
    checked ``accounts.passwords.passphrase_problems``."""
    write_atomic(key_path, _passphrase_body(master, vault_id, passphrase, params or KdfParams()))


def protect_with_machine(key_path: Path, master: MasterKey, vault_id: str) -> None:
    """Seal the key file to this machine (VaultKeyError with the reason when it cannot)."""
    write_atomic(key_path, _machine_body(master, vault_id))


def unprotect(key_path: Path, master: MasterKey, vault_id: str) -> None:
    """Back to the plain 0600 file (``pacsvault-master-key/v1``)."""
    write_atomic(key_path, _plain_body(master, vault_id))


def rewrite_key_file_like(old_path: Path, new_path: Path, master: MasterKey, vault_id: str,
                          passphrase: str | None = None) -> None:
    """Write ``master`` to ``new_path`` (atomically, replacing it if present) with the same
    protection as ``old_path`` (key rotation). A passphrase-protected old file needs its
    passphrase, checked against that file (KeyUnavailable without one, VaultKeyError when
    it does not open it), so the new key is never sealed under a mistyped passphrase."""
    text = _read_private(old_path)
    kind = kind_of_text(text)
    if kind == FILE:
        write_atomic(new_path, _plain_body(master, vault_id))
    elif kind == PASSPHRASE:
        if passphrase is None:
            raise KeyUnavailable(f"the key file {old_path} is protected by a passphrase: "
                                 "it is needed to protect the new key the same way")
        fields = _fields(text)
        old_vault = fields.get("vault", "")
        _open_sealed(fields, passphrase, old_vault, old_path)
        old_params = _params_of(fields, old_path)
        params = KdfParams(max(old_params.time_cost, ARGON2_TIME),
                           max(old_params.memory_kib, ARGON2_MEMORY_KIB),
                           old_params.parallelism)
        write_atomic(new_path, _passphrase_body(master, vault_id, passphrase, params))
    elif kind == MACHINE:
        write_atomic(new_path, _machine_body(master, vault_id))
    else:
        raise VaultKeyError(f"{old_path} is not a pacsvault key file")


# --- where the passphrase comes from -------------------------------------------------------


def read_passphrase_file(path: Path) -> str:
    """The first line of a passphrase file, refusing one other users can read."""
    try:
        return read_private_text(path, first_line=True)
    except PrivateFileError as exc:
        if exc.problem == PrivateFileError.MISSING:
            raise VaultKeyError(f"passphrase file not found: {path}") from None
        raise VaultKeyError(exc.explain("passphrase file")) from None


def passphrase_provider(passphrase_file: Path | None = None,
                        prompt: str = "Passphrase of the master key: ") -> PassphraseProvider:
    """Where commands get the passphrase, in order: ``--passphrase-file``, the systemd
    credential ``$CREDENTIALS_DIRECTORY/pacsvault-passphrase`` (``LoadCredential=``), a
    prompt when stdin is a terminal; else None (the key stays unavailable). Never argv or
    the environment: both are readable by other processes."""

    def provide() -> str | None:
        if passphrase_file is not None:
            return read_passphrase_file(passphrase_file)
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if directory and (Path(directory) / PASSPHRASE_CREDENTIAL).is_file():
            return read_passphrase_file(Path(directory) / PASSPHRASE_CREDENTIAL)
        if sys.stdin.isatty():
            return getpass.getpass(prompt) or None
        return None

    return provide


# --- where the key lies --------------------------------------------------------------------


def _device_of(path: Path) -> int | None:
    probe = path
    while True:
        try:
            return probe.stat().st_dev
        except FileNotFoundError:
            if probe.parent == probe:
                return None
            probe = probe.parent
        except OSError:
            return None


def describe(key_path: Path, data_dir: Path) -> dict[str, Any]:
    """What ``keys status`` says: protection, file, owner, mode, medium present, and where
    the key lies relative to the data (same filesystem, inside what a backup copies)."""
    key_path = key_path.absolute()
    report: dict[str, Any] = {"key_file": str(key_path), "present": False,
                              "protection": "missing", "mode": None, "owner": None}
    try:
        st = key_path.stat()
    except OSError:
        st = None
    if st is not None:
        report["present"] = True
        report["mode"] = f"{stat.S_IMODE(st.st_mode):04o}"
        try:
            report["owner"] = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            report["owner"] = str(st.st_uid)
        try:
            report["protection"] = protection_of(key_path)
        except VaultKeyError as exc:  # 0644 and the like: say so, do not hide it
            report["protection"] = "refused"
            report["problem"] = str(exc)
    key_dev, data_dev = _device_of(key_path), _device_of(data_dir)
    same = key_dev is not None and key_dev == data_dev
    inside = key_path.resolve().is_relative_to(data_dir.resolve())
    report["same_filesystem"] = same
    report["in_data_backup"] = inside
    warnings: list[str] = []
    if inside:
        warnings.append("the key file is inside the data directory: a backup of the data "
                        "carries the key; move it out (pacsvault keys status --help)")
    if same and report["protection"] in (FILE, "refused"):
        warnings.append("the key sits next to the images: a stolen disk carries both; move "
                        "it to a USB key or protect it with a passphrase")
    elif same:
        warnings.append(f"the key file is on the same filesystem as the images (protected by "
                        f"{report['protection']})")
    report["warnings"] = warnings
    return report
