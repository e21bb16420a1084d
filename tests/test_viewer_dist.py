"""The OHIF distribution: verified before extraction, trimmed, pre-compressed, cached.

Everything runs on a small fake npm tarball built here (no network): the pinned release's
integrity is checked exactly as the real one would be, so a fake tarball only installs with
a ``Release`` carrying its own integrity, and the CLI (pinned release) refuses it.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import io
import json
import random
import tarfile
import urllib.request
from pathlib import Path

import pytest

from pacsvault.cli.main import main
from pacsvault.viewer import PINNED, ViewerDist, ViewerError, dist, install, load

HASHED_BUNDLE = "app.bundle.0123456789abcdef0123.js"
# The two inline scripts of OHIF's index.html (their CSP hashes are checked by the web tests).
INLINE_SCRIPTS = (
    "window.PUBLIC_URL = '/';",
    "\n      if ('serviceWorker' in navigator) {\n"
    "        navigator.serviceWorker.register('/sw.js');\n      }\n    ",
)
INDEX_HTML = (
    '<!doctype html><html lang="en-US"><head><meta charset="utf-8"/>'
    "<title>OHIF Viewer</title>"
    f"<script>{INLINE_SCRIPTS[0]}</script>"
    '<script src="/app-config.js"></script>'
    '<link href="/app.bundle.css" rel="stylesheet">'
    f'<script defer src="/{HASHED_BUNDLE}"></script></head>'
    "<body><noscript>You need to enable JavaScript to run this app.</noscript>"
    '<div id="root"></div>'
    f"<script>{INLINE_SCRIPTS[1]}</script></body></html>\n"
).encode()


def _js(label: str, size: int) -> bytes:
    line = f"export function {label}(a, b) {{ return a + b; }} // {label}\n".encode()
    return (line * (size // len(line) + 1))[:size]


# Kept in the installed directory: relative path -> content.
KEPT = {
    "index.html": INDEX_HTML,
    HASHED_BUNDLE: _js("bundle", 40_000),
    "app.bundle.css": b".ohif { color: #fff; background: #000; }\n" * 100,
    "init-service-worker.js": _js("sw", 3_000),
    "assets/logo.svg": b'<svg xmlns="http://www.w3.org/2000/svg"></svg>\n',  # < 1 KB
    "assets/noise.js": random.Random(7).randbytes(4096),  # incompressible
    "assets/photo.png": b"\x89PNG" + b"\x00" * 4000,  # not a compressible type
    "ohif-logo.woff2": b"wOF2" + b"\x00" * 100,
    ".hidden": b"not for the browser\n",
}
# In the package but trimmed (or outside dist/): never in the installed directory.
TRIMMED = {
    "ort/x.wasm": b"\x00asm" + b"\x01" * 5000,
    "dicom-microscopy-viewer/a.js": _js("micro", 2000),
    "x.js.map": b'{"version": 3, "mappings": ""}' * 50,
    "assets/y.css.map": b'{"version": 3}',
    "app-config.js": b"window.config = {dataSources: ['https://example.invalid']};\n",
    "_headers": b"/*\n  Access-Control-Allow-Origin: *\n",
    "_redirects": b"/* /index.html 200\n",
    "serve.json": b'{"rewrites": []}',
}


def _add(archive: tarfile.TarFile, name: str, data: bytes = b"", *,
         kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 1_700_000_000
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    else:
        info.linkname = link
        archive.addfile(info)


def integrity_of(data: bytes) -> str:
    """npm's ``dist.integrity``."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def fake_release(tarball: Path) -> dist.Release:
    return dist.Release(name="@ohif/app", version="0.0.0-test",
                        tarball="https://registry.invalid/@ohif/app/-/app-0.0.0-test.tgz",
                        integrity=integrity_of(tarball.read_bytes()))


def build_tarball(path: Path, *, hostile_inside: str = "", index: bool = True,
                  evil_dir: Path | None = None) -> Path:
    """An npm-style ``.tgz`` of a fake OHIF distribution.

    Always present, and harmless because they are outside ``package/dist/``: a ``../``
    member, an absolute member (in ``evil_dir``) and a symbolic link out. With
    ``hostile_inside`` ("dotdot", "link", "absolute-link", "hardlink"): such a member
    *inside* ``package/dist/``, which the extraction filter must refuse.
    """
    evil_dir = evil_dir or path.parent
    with tarfile.open(path, "w:gz") as archive:
        _add(archive, "package", kind=tarfile.DIRTYPE)
        _add(archive, "package/package.json", b'{"name": "@ohif/app"}')
        _add(archive, "package/README.md", b"# OHIF\n" * 300)
        _add(archive, "package/dist", kind=tarfile.DIRTYPE)
        _add(archive, "package/dist/", kind=tarfile.DIRTYPE)
        for relative, data in {**KEPT, **TRIMMED}.items():
            if relative == "index.html" and not index:
                continue
            _add(archive, f"package/dist/{relative}", data)
        _add(archive, "../evil-dotdot.txt", b"evil")
        _add(archive, str(evil_dir / "evil-absolute.txt"), b"evil")
        _add(archive, "package/evil-link", kind=tarfile.SYMTYPE, link="../../../../..")
        if hostile_inside == "dotdot":
            _add(archive, "package/dist/../../../evil-inside.txt", b"evil")
        elif hostile_inside == "link":
            _add(archive, "package/dist/evil-link.js", kind=tarfile.SYMTYPE,
                 link="../../../../../etc/passwd")
        elif hostile_inside == "absolute-link":
            _add(archive, "package/dist/evil-abs-link.js", kind=tarfile.SYMTYPE,
                 link="/etc/passwd")
        elif hostile_inside == "hardlink":
            _add(archive, "package/dist/evil-hard.js", kind=tarfile.LNKTYPE,
                 link="/etc/passwd")
        else:
            assert not hostile_inside, hostile_inside
    return path


@pytest.fixture
def tarball(tmp_path: Path) -> Path:
    (tmp_path / "pkg").mkdir()
    return build_tarball(tmp_path / "pkg" / "app.tgz")


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}


def _no_leftovers(parent: Path) -> None:
    if parent.exists():
        assert not [p.name for p in parent.iterdir() if p.name.startswith(".ohif-")]


def _no_evil(root: Path) -> None:
    found = [p for p in root.rglob("*evil*") if p.name != "app.tgz"]
    assert not found, found


# --- install -----------------------------------------------------------------------------


def test_install_verifies_trims_compresses_and_marks(tmp_path: Path, tarball: Path) -> None:
    release = fake_release(tarball)
    target = tmp_path / "cache" / "viewer" / "ohif-test"
    assert install(target, tarball=tarball, release=release) == target

    files = _files(target)
    for relative, data in KEPT.items():
        assert (target / relative).read_bytes() == data, relative
    for relative in TRIMMED:
        assert relative not in files, relative
    assert not (target / "ort").exists() and not (target / "dicom-microscopy-viewer").exists()
    assert not any(name.endswith(".map") for name in files)
    assert not (target / "README.md").exists() and not (target / "package.json").exists()
    # nothing outside dist/ anywhere: not the ../ member, not the absolute one, no link
    _no_evil(tmp_path)
    assert not [p for p in target.rglob("*") if p.is_symlink()]

    # a .gz twin for every compressible file over 1 KB that gzip shrinks, none for others
    twins = {name for name in files if name.endswith(".gz")}
    assert twins == {f"{HASHED_BUNDLE}.gz", "app.bundle.css.gz",
                     "init-service-worker.js.gz"}, twins
    for twin in twins:
        original = (target / twin[:-3]).read_bytes()
        packed = (target / twin).read_bytes()
        assert gzip.decompress(packed) == original
        assert len(packed) < len(original)
    for relative, data in KEPT.items():
        if f"{relative}.gz" not in twins:  # small, incompressible, or not a text type
            assert (len(data) <= 1024 or Path(relative).suffix not in dist.COMPRESSIBLE
                    or len(gzip.compress(data)) >= 0.9 * len(data)), relative

    marker = json.loads((target / dist.MARKER).read_text())
    assert marker == {"name": release.name, "version": release.version,
                      "integrity": release.integrity}
    assert files == set(KEPT) | twins | {dist.MARKER}
    _no_leftovers(target.parent)

    loaded = load(target, release)
    assert isinstance(loaded, ViewerDist)
    assert loaded.root == target.resolve() and loaded.version == release.version
    # the web application loads the pinned release: a fake one is not it
    assert load(target) is None

    # again: an intact install is kept as is (the tarball is not even read)
    before = (target / dist.MARKER).stat().st_mtime_ns
    bundle_before = (target / HASHED_BUNDLE).stat().st_mtime_ns
    assert install(target, tarball=tmp_path / "missing.tgz", release=release) == target
    assert (target / dist.MARKER).stat().st_mtime_ns == before
    assert (target / HASHED_BUNDLE).stat().st_mtime_ns == bundle_before
    assert _files(target) == files


def test_incomplete_install_is_replaced(tmp_path: Path, tarball: Path) -> None:
    release = fake_release(tarball)
    target = tmp_path / "viewer"
    target.mkdir()
    (target / "index.html").write_text("half-written")
    (target / "stale.js").write_text("from an interrupted install")
    assert load(target, release) is None  # no marker: not an install
    install(target, tarball=tarball, release=release)
    assert not (target / "stale.js").exists()
    assert (target / "index.html").read_bytes() == INDEX_HTML
    assert load(target, release) is not None


def test_tampered_tarball_installs_nothing(tmp_path: Path, tarball: Path) -> None:
    release = fake_release(tarball)
    data = bytearray(tarball.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered = tmp_path / "tampered.tgz"
    tampered.write_bytes(bytes(data))
    target = tmp_path / "cache" / "ohif"
    with pytest.raises(ViewerError, match="integrity"):
        install(target, tarball=tampered, release=release)
    assert not target.exists() and not target.parent.exists()  # not even the parent

    # same with a cache parent that exists: no staging directory left behind
    target.parent.mkdir()
    with pytest.raises(ViewerError, match="integrity"):
        install(target, tarball=tampered, release=release)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []

    # an unsupported algorithm is refused too, whatever the bytes
    sha256 = dataclasses.replace(release, integrity="sha256-" + "A" * 43 + "=")
    with pytest.raises(ViewerError, match="unsupported integrity algorithm"):
        install(target, tarball=tarball, release=sha256)
    assert not target.exists()


def test_package_without_index_leaves_no_staging(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    tarball = build_tarball(tmp_path / "pkg" / "app.tgz", index=False)
    target = tmp_path / "cache" / "ohif"
    with pytest.raises(ViewerError, match=r"no dist/index\.html"):
        install(target, tarball=tarball, release=fake_release(tarball))
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize("hostile", ["dotdot", "link", "absolute-link", "hardlink"])
def test_hostile_members_inside_dist_are_refused(tmp_path: Path, hostile: str) -> None:
    """Even a tarball matching its integrity cannot write outside the cache: tarfile's
    "data" filter refuses ``../`` names and links out (the whole install fails)."""
    root = tmp_path / "a" / "b" / "c"
    (root / "pkg").mkdir(parents=True)
    tarball = build_tarball(root / "pkg" / "app.tgz", hostile_inside=hostile)
    target = root / "cache" / "ohif"
    with pytest.raises((ViewerError, tarfile.TarError)):
        install(target, tarball=tarball, release=fake_release(tarball))
    _no_evil(tmp_path)
    assert not target.exists()
    _no_leftovers(target.parent)


def test_download_is_https_only_and_needs_no_network(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network used")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    for url in ("http://registry.npmjs.org/@ohif/app/-/app-3.12.10.tgz",
                "ftp://registry.npmjs.org/app.tgz", "file:///etc/passwd",
                "HTTPS-not-really://x", ""):
        with pytest.raises(ViewerError, match="HTTPS"):
            dist._download(url)
    plain = dist.Release(name="@ohif/app", version="1", tarball="http://registry.invalid/a.tgz",
                         integrity=PINNED.integrity)
    target = tmp_path / "ohif"
    with pytest.raises(ViewerError, match="HTTPS"):
        install(target, release=plain)
    assert not target.exists()


def test_pinned_release_is_npm_https_sha512() -> None:
    assert PINNED.tarball.startswith("https://registry.npmjs.org/@ohif/app/-/")
    assert PINNED.tarball.endswith(f"app-{PINNED.version}.tgz")
    algorithm, _, digest = PINNED.integrity.partition("-")
    assert algorithm == "sha512" and len(base64.b64decode(digest, validate=True)) == 64
    assert dist.default_dir().name == f"ohif-{PINNED.version}"


# --- what the web application may serve ---------------------------------------------------


def test_file_stays_below_the_root(tmp_path: Path, tarball: Path) -> None:
    release = fake_release(tarball)
    target = install(tmp_path / "ohif", tarball=tarball, release=release)
    (tmp_path / "secret.txt").write_text("outside")
    viewer = load(target, release)
    assert viewer is not None
    refused = ["", "/", "../x", "../secret.txt", "a/../b", "assets/../index.html", ".",
               "./index.html", "assets//logo.svg", "assets/", "/index.html", ".hidden",
               "assets/.hidden", dist.MARKER, "assets\\logo.svg", "..\\secret.txt",
               "assets", "missing.js", "ort/x.wasm", "x.js.map"]
    for relative in refused:
        assert viewer.file(relative) is None, relative
    assert viewer.file("index.html") == viewer.root / "index.html"
    assert viewer.file(HASHED_BUNDLE) == viewer.root / HASHED_BUNDLE
    found = viewer.file("assets/logo.svg")
    assert found is not None and found.read_bytes() == KEPT["assets/logo.svg"]
    assert viewer.file(f"{HASHED_BUNDLE}.gz") is not None


# --- the command ---------------------------------------------------------------------------


def test_cli_status(tmp_path: Path, tarball: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["viewer", "status", "--dir", str(empty)]) == 1
    err = capsys.readouterr().err
    assert "not installed" in err and "pacsvault viewer install" in err
    assert PINNED.version in err

    # an install of the pinned release (its marker) is reported with its place
    release = fake_release(tarball)
    target = install(tmp_path / "ohif", tarball=tarball, release=release)
    marker = {"name": PINNED.name, "version": PINNED.version, "integrity": PINNED.integrity}
    (target / dist.MARKER).write_text(json.dumps(marker))
    assert main(["viewer", "status", "--dir", str(target)]) == 0
    err = capsys.readouterr().err
    assert PINNED.version in err and str(target.resolve()) in err


def test_cli_install_refuses_a_tarball_that_is_not_the_pinned_release(
        tmp_path: Path, tarball: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "cache" / "ohif"
    code = main(["viewer", "install", "--dir", str(target), "--from-tarball", str(tarball)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("pacsvault: error: viewer not installed:"), err
    assert "integrity" in err and "nothing was installed" in err
    assert "Traceback" not in err
    assert not target.exists()
    _no_leftovers(target.parent)

    code = main(["viewer", "install", "--dir", str(target),
                 "--from-tarball", str(tmp_path / "no-such.tgz")])
    assert code == 2
    err = capsys.readouterr().err
    assert "viewer not installed" in err and "no-such.tgz" in err
    assert not target.exists()
