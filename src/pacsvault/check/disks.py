"""Is a path on an encrypted block device? Read from ``/proc`` and ``/sys`` only.

Why read-only kernel files rather than ``lsblk``/``cryptsetup``: no tool to install, no root
needed, and every input can be replaced by a fake tree in tests. The answer for a path:

* find its mount in ``/proc/self/mountinfo`` (the longest mount point containing it, the
  last one listed when mounts are stacked) and that mount's device number ``MAJ:MIN``;
* follow ``/sys/dev/block/MAJ:MIN`` to the device; it is *encrypted* when it is a
  dm-crypt mapping (``dm/uuid`` starts with ``CRYPT-``, what cryptsetup names LUKS and plain
  mappings alike), or when every device under it (``slaves/``: LVM on LUKS, RAID of LUKS
  members) is; a partition by its disk; a loop device by its backing file's own disk;
* memory filesystems (tmpfs, ramfs) are ``memory``: nothing reaches a disk (except swap,
  checked on its own); what cannot be told (NFS, overlay in a container, ZFS with its own
  encryption, btrfs whose source is not a device) is ``unknown``, said as such.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

ENCRYPTED, PLAIN, MEMORY, UNKNOWN = "encrypted", "plain", "memory", "unknown"
MEMORY_FS = frozenset({"tmpfs", "ramfs", "devtmpfs"})
_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(text: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), text)


@dataclass(frozen=True)
class Mount:
    point: str
    device: str  # "MAJ:MIN"
    fstype: str
    source: str


def parse_mountinfo(text: str) -> list[Mount]:
    mounts: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        mounts.append(Mount(_unescape(fields[4]), fields[2], tail[0], _unescape(tail[1])))
    return mounts


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    best: Mount | None = None
    for m in mounts:  # later lines win ties: a mount stacked over another hides it
        inside = path == m.point or path.startswith(m.point.rstrip("/") + "/")
        if inside and (best is None or len(m.point) >= len(best.point)):
            best = m
    return best


@dataclass(frozen=True)
class Verdict:
    state: str  # ENCRYPTED, PLAIN, MEMORY, UNKNOWN
    device: str = ""  # what was looked at, e.g. "vda", "dm-0 (CRYPT)"
    fstype: str = ""


class BlockProbe:
    """The kernel's view, from ``sys_root`` (default ``/sys``) and the given texts."""

    def __init__(self, sys_root: Path, mountinfo: str, swaps: str) -> None:
        self.sys_root = sys_root
        self.mounts = parse_mountinfo(mountinfo)
        self.swaps = swaps

    @classmethod
    def real(cls) -> BlockProbe:
        return cls(Path("/sys"), read("/proc/self/mountinfo"), read("/proc/swaps"))

    def of_path(self, path: Path, depth: int = 0) -> Verdict:
        real = os.path.realpath(path)
        mount = mount_of(real, self.mounts)
        if mount is None:
            return Verdict(UNKNOWN)
        if mount.fstype in MEMORY_FS:
            return Verdict(MEMORY, fstype=mount.fstype)
        sys_dev = self.sys_root / "dev" / "block" / mount.device
        if mount.device.startswith("0:") or not sys_dev.exists():
            by_name = self._by_source(mount.source)  # btrfs and the like: major 0
            if by_name is None:
                return Verdict(UNKNOWN, fstype=mount.fstype)
            sys_dev = by_name
        state, name = self._classify(Path(os.path.realpath(sys_dev)), depth)
        return Verdict(state, name, mount.fstype)

    def swap_devices(self) -> list[tuple[str, Verdict]]:
        """Each active swap area and its verdict (zram is memory)."""
        out: list[tuple[str, Verdict]] = []
        for line in self.swaps.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 2:
                continue
            name, kind = _unescape(fields[0]), fields[1]
            if kind == "file":
                out.append((name, self.of_path(Path(name))))
                continue
            dev = self._by_source(name)
            if dev is None:
                out.append((name, Verdict(UNKNOWN)))
            else:
                state, shown = self._classify(Path(os.path.realpath(dev)), 0)
                out.append((name, Verdict(state, shown)))
        return out

    def _by_source(self, source: str) -> Path | None:
        if not source.startswith("/dev/"):
            return None
        name = os.path.basename(os.path.realpath(source)) if os.path.exists(source) \
            else os.path.basename(source)
        candidate = self.sys_root / "class" / "block" / name
        return candidate if candidate.exists() else None

    def _classify(self, dev: Path, depth: int) -> tuple[str, str]:
        name = dev.name
        if depth > 8:
            return UNKNOWN, name
        if name.startswith("zram"):
            return MEMORY, name
        uuid = read(str(dev / "dm" / "uuid")).strip()
        if uuid.startswith("CRYPT-"):
            return ENCRYPTED, f"{name} (dm-crypt)"
        backing = read(str(dev / "loop" / "backing_file")).strip()
        if backing:
            return self.of_path(Path(backing), depth + 1).state, f"{name} -> {backing}"
        if (dev / "partition").exists():
            state, _ = self._classify(dev.parent, depth + 1)  # sda1 lies in sda's dir
            return state, name
        slaves_dir = dev / "slaves"
        slaves = sorted(slaves_dir.iterdir()) if slaves_dir.is_dir() else []
        if not slaves:
            return PLAIN, name
        states = [self._classify(Path(os.path.realpath(s)), depth + 1)[0] for s in slaves]
        if all(s == ENCRYPTED for s in states):
            return ENCRYPTED, f"{name} (on dm-crypt)"
        if PLAIN in states:
            return PLAIN, name
        return UNKNOWN, name


def read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""
