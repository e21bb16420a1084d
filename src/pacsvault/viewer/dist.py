"""Download, verify, trim and cache OHIF's prebuilt static distribution.

Why a pinned tarball with its registry integrity hash rather than ``npm install``: the
viewer runs with the user's session, so what we serve must be exactly the bytes we
reviewed. The npm registry's ``dist.integrity`` (SRI, SHA-512) is checked before a single
file is extracted; a mismatch leaves the cache untouched.

The cached directory holds the ``dist/`` of the package minus the AI models (``ort/``),
the microscopy viewer and source maps (~200 MB -> ~45 MB), plus a ``.gz`` twin of every
compressible file so a remote doctor downloads ~4x less. ``pacsvault-viewer.json`` marks a
complete install (written last, after an atomic rename of the whole directory).
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import platformdirs


class ViewerError(Exception):
    """The viewer cannot be installed or loaded; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Release:
    name: str
    version: str
    tarball: str
    integrity: str  # npm "dist.integrity": sha512-<base64>


PINNED = Release(
    name="@ohif/app",
    # 3.13 requires Node >= 24 to build; the prebuilt 3.12 line is the one verified here.
    version="3.12.10",
    tarball="https://registry.npmjs.org/@ohif/app/-/app-3.12.10.tgz",
    integrity=("sha512-0kuF66Mq9c9dMD++bUsTjMrJpXJwaZhz9B4uS244DawAjSkTwIYFU93pxPuRUQixaRi7Q"
               "AHlF3Fe1qudBlZrmA=="),
)

MARKER = "pacsvault-viewer.json"
# Removed from the distribution: not used by a practice, or replaced by pacsvault.
TRIM_DIRS = ("ort", "dicom-microscopy-viewer")
TRIM_FILES = ("app-config.js", "_headers", "_redirects", "serve.json")
COMPRESSIBLE = (".js", ".css", ".wasm", ".svg", ".json", ".html", ".txt", ".mjs")
DOWNLOAD_TIMEOUT = 120.0
MAX_TARBALL = 200 * 1024 * 1024


def default_dir(release: Release = PINNED) -> Path:
    """Where the trimmed distribution is cached (outside the vault: it is not data)."""
    return Path(platformdirs.user_cache_dir("pacsvault")) / "viewer" / f"ohif-{release.version}"


def _check_integrity(data: bytes, integrity: str) -> None:
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512":
        raise ViewerError(f"unsupported integrity algorithm {algorithm!r}")
    actual = base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")
    if actual != expected:
        raise ViewerError("the downloaded viewer does not match its pinned integrity hash; "
                          "nothing was installed")


def _download(url: str) -> bytes:
    if not url.startswith("https://"):
        raise ViewerError("the viewer is only downloaded over HTTPS")
    request = urllib.request.Request(  # noqa: S310 - https only, checked above
        url, headers={"User-Agent": "pacsvault-installer"})
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response:  # noqa: S310
        data: bytes = response.read(MAX_TARBALL + 1)
    if len(data) > MAX_TARBALL:
        raise ViewerError("the viewer download is larger than expected; nothing was installed")
    return data


def _extract_dist(data: bytes, into: Path) -> None:
    """Extract ``package/dist/**`` only, with tarfile's "data" filter (no links out,
    no absolute paths, no device files)."""
    prefix = "package/dist/"
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")  # noqa: SIM115
    except tarfile.TarError as exc:
        raise ViewerError("the viewer package is not a valid archive") from exc
    with archive:
        members = []
        for member in archive.getmembers():
            if not member.name.startswith(prefix) or member.name == prefix:
                continue
            relative = member.name[len(prefix):]
            top = relative.split("/", 1)[0]
            if top in TRIM_DIRS or relative in TRIM_FILES or relative.endswith(".map"):
                continue
            member.name = relative
            members.append(member)
        try:
            archive.extractall(into, members=members, filter="data")
        except tarfile.TarError as exc:
            raise ViewerError("the viewer package is malformed; nothing was installed") from exc


def _compress(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and path.suffix in COMPRESSIBLE and path.stat().st_size > 1024:
            data = path.read_bytes()
            packed = gzip.compress(data, compresslevel=9, mtime=0)
            if len(packed) < len(data) * 0.9:
                path.with_name(path.name + ".gz").write_bytes(packed)


def install(target: Path | None = None, *, tarball: Path | None = None,
            release: Release = PINNED) -> Path:
    """Install the pinned viewer into ``target`` (default: the cache) unless it is already
    there; returns the directory. ``tarball``: a local copy of the release (offline)."""
    target = target or default_dir(release)
    if _marker_ok(target, release):
        return target
    data = tarball.read_bytes() if tarball is not None else _download(release.tarball)
    _check_integrity(data, release.integrity)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ohif-", dir=target.parent))
    try:
        _extract_dist(data, staging)
        if not (staging / "index.html").is_file():
            raise ViewerError("the viewer package has no dist/index.html")
        _compress(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    marker = {"name": release.name, "version": release.version,
              "integrity": release.integrity}
    (target / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    return target


def _marker_ok(target: Path, release: Release) -> bool:
    try:
        marker = json.loads((target / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(marker.get("integrity") == release.integrity
                and (target / "index.html").is_file())


@dataclasses.dataclass(frozen=True)
class ViewerDist:
    """An installed distribution, as the web application serves it."""

    root: Path
    version: str

    def file(self, relative: str) -> Path | None:
        """The file for a URL path below the root, or None (never outside the root, never
        our marker, never a hidden file)."""
        if not relative or relative.startswith("/") or "\\" in relative:
            return None
        parts = relative.split("/")
        if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            return None
        if relative == MARKER:
            return None
        path = self.root.joinpath(*parts).resolve()
        # resolve(): a symbolic link planted in the cache must not serve a file elsewhere.
        return path if path.is_relative_to(self.root) and path.is_file() else None


def load(directory: Path | None = None, release: Release = PINNED) -> ViewerDist | None:
    """The installed viewer, or None when it was never installed (the web app then says
    how to install it instead of failing)."""
    root = directory or default_dir(release)
    if not _marker_ok(root, release):
        return None
    return ViewerDist(root=root.resolve(), version=release.version)
