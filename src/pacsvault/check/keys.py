"""Check section 'keys': where the master key lies, what the disks give away, who may read.

Why: the images are ciphertext, so what decides whether a stolen disk (or a copy of it)
is a breach is the master key: beside the data on an unencrypted disk, a thief has both.
Severities follow that: key file in clear on the data's unencrypted filesystem is critical;
a clear key file on any unencrypted disk, swap on an unencrypted device (decrypted images
and keys can be paged out) and key/data permissions are warnings; the data directory on an
unencrypted disk is information only (it holds ciphertext, the SQLCipher index and the
signed trail; its settings and user names are what shows).

Options (``ctx.options``): ``sys_root`` (a fake ``/sys`` tree), ``mountinfo`` and
``swaps`` (the texts of ``/proc/self/mountinfo`` and ``/proc/swaps``), ``key_file`` (the
key path when the vault was opened without one, e.g. a copy).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pacsvault.check import disks
from pacsvault.check.model import (
    CNIL_CRYPTO,
    CNIL_SERVERS,
    GDPR_32,
    CheckContext,
    Finding,
    Localized,
    Severity,
    requirement,
)
from pacsvault.crypto import protection

SECTION = "keys"
REQ = requirement(GDPR_32, CNIL_CRYPTO)
REQ_SERVER = requirement(GDPR_32, CNIL_SERVERS)
# What a backup or copy of the data directory takes besides the objects.
_DATA_FILES = ("vault.json", "index.db", "pacsvault.toml", "audit", "tls")


def probe_of(ctx: CheckContext) -> disks.BlockProbe:
    o = ctx.options
    mountinfo = o["mountinfo"] if "mountinfo" in o else disks.read("/proc/self/mountinfo")
    swaps = o["swaps"] if "swaps" in o else disks.read("/proc/swaps")
    return disks.BlockProbe(Path(o.get("sys_root", "/sys")), str(mountinfo), str(swaps))


def check(ctx: CheckContext) -> list[Finding]:
    data_dir = ctx.vault.layout.root
    key_opt = ctx.options.get("key_file") or ctx.vault.key_path
    probe = probe_of(ctx)
    out: list[Finding] = []
    data_v = probe.of_path(data_dir)
    if data_v.state == disks.PLAIN:
        out.append(Finding(
            id="keys.data-unencrypted-disk", section=SECTION, severity=Severity.INFO,
            title=Localized("Data directory on an unencrypted disk",
                            "Répertoire des données sur un disque non chiffré"),
            requirement=REQ,
            evidence=Localized(
                f"{data_dir} is on {data_v.device} ({data_v.fstype}), not dm-crypt/LUKS. "
                "Images and the index are encrypted by pacsvault; settings, user names in "
                "the audit trail and certificates are readable from the disk.",
                f"{data_dir} est sur {data_v.device} ({data_v.fstype}), sans dm-crypt/LUKS. "
                "Images et index sont chiffrés par pacsvault ; les réglages, les noms "
                "d’utilisateurs du journal d’audit et les certificats se lisent sur le "
                "disque."),
            fix=Localized(
                "When the machine is next reinstalled, choose full-disk encryption (LUKS).",
                "À la prochaine réinstallation de la machine, choisissez le chiffrement "
                "intégral du disque (LUKS)."),
            data={"path": str(data_dir), "device": data_v.device}))
    if key_opt is not None:
        out.extend(_key(Path(key_opt), data_dir, probe, data_v))
    out.extend(_swap(probe))
    out.extend(_permissions(data_dir, ctx))
    return out


def _key(key: Path, data_dir: Path, probe: disks.BlockProbe,
         data_v: disks.Verdict) -> list[Finding]:
    report = protection.describe(key, data_dir)
    if not report["present"]:
        return []  # a removed key medium (sealed mode) is the safe case
    clear = report["protection"] in (protection.FILE, "refused")
    key_v = probe.of_path(key)
    out: list[Finding] = []
    if report["in_data_backup"] or report["same_filesystem"]:
        worst = clear and data_v.state != disks.ENCRYPTED
        out.append(Finding(
            id="keys.key-with-data", section=SECTION,
            severity=Severity.CRITICAL if worst else Severity.WARNING,
            title=Localized("Master key on the same disk as the images",
                            "Clé maîtresse sur le même disque que les images"),
            requirement=REQ,
            evidence=Localized(
                f"The key file {key} is on the same filesystem as {data_dir} (protection: "
                f"{report['protection']}; disk: {data_v.state}). Whoever takes or copies "
                "that disk has the images and the key that opens them.",
                f"Le fichier de clé {key} est sur le même système de fichiers que "
                f"{data_dir} (protection : {report['protection']} ; disque : "
                f"{data_v.state}). Qui emporte ou copie ce disque a les images et la clé "
                "qui les ouvre."),
            fix=Localized(
                "Move the key file to a USB key or another disk (and set [server] key_file), "
                "or protect it with a passphrase or this machine's TPM ('pacsvault keys "
                "protect').",
                "Déplacez le fichier de clé sur une clé USB ou un autre disque (et réglez "
                "[server] key_file), ou protégez-la par une phrase de passe ou le TPM de "
                "la machine (« pacsvault keys protect »)."),
            data={"key_file": str(key), "protection": report["protection"],
                  "disk": data_v.state}))
    elif clear and key_v.state == disks.PLAIN:
        out.append(Finding(
            id="keys.key-unencrypted-disk", section=SECTION, severity=Severity.WARNING,
            title=Localized("Master key in clear on an unencrypted disk",
                            "Clé maîtresse en clair sur un disque non chiffré"),
            requirement=REQ,
            evidence=Localized(
                f"The key file {key} is not passphrase- or machine-protected and lies on "
                f"{key_v.device} ({key_v.fstype}), not dm-crypt/LUKS.",
                f"Le fichier de clé {key} n’est protégé ni par phrase de passe ni par la "
                f"machine et se trouve sur {key_v.device} ({key_v.fstype}), sans "
                "dm-crypt/LUKS."),
            fix=Localized("Protect it ('pacsvault keys protect') or keep it on an "
                          "encrypted medium.",
                          "Protégez-la (« pacsvault keys protect ») ou gardez-la sur un "
                          "support chiffré."),
            data={"key_file": str(key), "device": key_v.device}))
    mode = int(str(report["mode"]), 8) if report["mode"] else 0
    if mode & 0o077 or (_owner_uid(key) not in (None, os.geteuid())):
        out.append(Finding(
            id="keys.key-permissions", section=SECTION, severity=Severity.CRITICAL,
            title=Localized("Master key readable by others",
                            "Clé maîtresse lisible par d’autres"),
            requirement=REQ_SERVER,
            evidence=Localized(
                f"The key file {key} has mode {report['mode']} and owner {report['owner']}.",
                f"Le fichier de clé {key} a le mode {report['mode']} et le propriétaire "
                f"{report['owner']}."),
            fix=Localized(f"chmod 600 {key}, owned by the account that runs pacsvault.",
                          f"chmod 600 {key}, propriété du compte qui exécute pacsvault."),
            data={"key_file": str(key), "mode": report["mode"]}))
    return out


def _owner_uid(path: Path) -> int | None:
    try:
        return path.stat().st_uid
    except OSError:
        return None


def _swap(probe: disks.BlockProbe) -> list[Finding]:
    plain = [(name, v) for name, v in probe.swap_devices() if v.state == disks.PLAIN]
    if not plain:
        return []
    names = ", ".join(name for name, _ in plain)
    return [Finding(
        id="keys.swap-unencrypted", section=SECTION, severity=Severity.WARNING,
        title=Localized("Swap on an unencrypted device", "Swap sur un périphérique non chiffré"),
        requirement=REQ,
        evidence=Localized(
            f"Swap {names} is not on dm-crypt/LUKS: decrypted images and keys held in memory "
            "can be written there in clear and stay after shutdown.",
            f"Le swap {names} n’est pas sur dm-crypt/LUKS : des images déchiffrées et des "
            "clés en mémoire peuvent y être écrites en clair et y rester après l’arrêt."),
        fix=Localized(
            "Encrypt swap (a random-key dm-crypt swap in /etc/crypttab, or swap inside the "
            "LUKS volume), use zram, or turn swap off.",
            "Chiffrez le swap (swap dm-crypt à clé aléatoire dans /etc/crypttab, ou swap dans "
            "le volume LUKS), utilisez zram, ou désactivez le swap."),
        data={"swap": [name for name, _ in plain]})]


def _permissions(data_dir: Path, ctx: CheckContext) -> list[Finding]:
    loose: list[str] = []
    try:
        closed = not stat.S_IMODE(data_dir.stat().st_mode) & 0o077
    except OSError:
        return []
    # A closed 0700 directory keeps what is inside from other accounts whatever its modes
    # (SQLite creates index.db with the umask): only an open one makes the inside count.
    inside = () if closed else tuple(data_dir / n for n in _DATA_FILES)
    for path in (data_dir, *inside):
        try:
            st = path.stat()
        except OSError:
            continue
        too_open = 0o077 if path != ctx.vault.layout.config else 0o022
        if stat.S_IMODE(st.st_mode) & too_open:
            loose.append(f"{path.name or path} {stat.S_IMODE(st.st_mode):04o}")
    if not loose:
        return []
    shown = ", ".join(loose)
    return [Finding(
        id="keys.data-permissions", section=SECTION, severity=Severity.WARNING,
        title=Localized("Data or settings open to other local accounts",
                        "Données ou réglages ouverts aux autres comptes locaux"),
        requirement=REQ_SERVER,
        evidence=Localized(
            f"In {data_dir}: {shown} (expected 0700 directories and 0600 files; settings "
            "not writable by others).",
            f"Dans {data_dir} : {shown} (attendu : répertoires 0700 et fichiers 0600 ; "
            "réglages non modifiables par d’autres)."),
        fix=Localized(f"chmod -R go-rwx {data_dir}", f"chmod -R go-rwx {data_dir}"),
        data={"paths": loose})]
