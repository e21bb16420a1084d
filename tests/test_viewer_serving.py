"""OHIF served same-origin behind the session, by the real application in-process.

A fake distribution (``tests.test_viewer_dist``'s tarball, installed with its own integrity)
is marked as the pinned release: the web application only serves a directory whose marker
carries ``PINNED.integrity`` (``load()`` is called with the pinned release). Nothing here
needs a browser or the network.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from pacsvault.viewer import PINNED, install
from pacsvault.viewer.dist import MARKER
from pacsvault.web import security
from pacsvault.web.viewer import _served
from tests.helpers import VaultDir
from tests.test_viewer_dist import (
    HASHED_BUNDLE,
    INDEX_HTML,
    INLINE_SCRIPTS,
    KEPT,
    build_tarball,
    fake_release,
)
from tests.web_helpers import FakeClock, LocalWeb, local_web

PASSWORD = "radio-du-matin-sur-la-plage"
USERS = {"drmartin": ["physician"], "root": ["admin"], "dpo": ["auditor"]}
FRENCH, ENGLISH = "fr-FR,fr;q=0.9,en;q=0.5", "en-US,en;q=0.9"
# The practice's name in the tab, pacsvault's phone and tablet layout last in <head>.
SERVED_INDEX = INDEX_HTML.replace(b"<title>OHIF Viewer</title>", b"<title>pacsvault</title>"
                                  ).replace(b"</head>", b'<link rel="stylesheet" '
                                            b'href="/static/ohif.css"></head>')
INLINE_HASHES = {base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()
                 for s in INLINE_SCRIPTS}


def _common_headers(response: httpx.Response) -> None:
    """What every response keeps, viewer or not (the viewer's CSP is checked by the tests)."""
    headers = response.headers
    where = f"{response.request.method} {response.request.url.path} ({response.status_code})"
    assert "max-age=" in headers.get("strict-transport-security", ""), where
    assert headers.get("x-content-type-options") == "nosniff", where
    assert headers.get("referrer-policy") == "no-referrer", where
    assert "frame-ancestors 'none'" in headers.get("content-security-policy", ""), where
    assert "server" not in headers, where


def _browser(web: LocalWeb) -> httpx.Client:
    """Like ``LocalWeb.browser()`` without its strict-CSP check (OHIF's pages relax it)."""
    transport = httpx.HTTPTransport(verify=ssl.create_default_context(cafile=str(web.ca)))
    return httpx.Client(base_url=f"https://127.0.0.1:{web.port}", transport=transport,
                        timeout=30, headers={"accept": "text/html"},
                        event_hooks={"response": [_common_headers]})


@dataclass
class Site:
    web: LocalWeb
    vault: VaultDir
    viewer_dir: Path
    root: Path
    browsers: dict[str, httpx.Client]

    @property
    def doctor(self) -> httpx.Client:
        return self.browsers["drmartin"]


def _vault(root: Path) -> VaultDir:
    """A new vault, created in-process (``make_vault`` runs ``pacsvault init``: seconds)."""
    from pacsvault.vault import create

    key = root / "keys" / "master.key"
    code = create(root / "data", key_file=key, ae_title="PACSVAULT")
    return VaultDir(root, key, code)


def _mark_as_pinned(directory: Path) -> None:
    marker = {"name": PINNED.name, "version": PINNED.version, "integrity": PINNED.integrity}
    (directory / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("viewer-serving")
    (root / "pkg").mkdir()
    tarball = build_tarball(root / "pkg" / "app.tgz")
    viewer_dir = install(root / "ohif", tarball=tarball, release=fake_release(tarball))
    _mark_as_pinned(viewer_dir)
    vault = _vault(root / "v")
    vault.set_toml("web", "viewer_dir", json.dumps(str(viewer_dir)))
    _served.cache_clear()
    try:
        with local_web(vault, FakeClock()) as web:
            browsers = {}
            try:
                for name, roles in USERS.items():
                    web.accounts.add_user(name, roles, PASSWORD)
                    browsers[name] = _browser(web)
                    web.sign_in(browsers[name], name, PASSWORD)
                yield Site(web, vault, viewer_dir, root, browsers)
            finally:
                for browser in browsers.values():
                    browser.close()
    finally:
        _served.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    _served.cache_clear()
    yield
    _served.cache_clear()


@pytest.fixture
def anonymous(site: Site) -> Iterator[httpx.Client]:
    with _browser(site.web) as browser:
        yield browser


def _use_viewer_dir(site: Site, monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """``[web] viewer_dir`` as if the toml said so (the app reads it at each request)."""
    settings = site.web.vault.settings
    web = settings.web.model_copy(update={"viewer_dir": str(directory)})
    monkeypatch.setattr(site.web.vault, "settings", settings.model_copy(update={"web": web}))


def _raw(browser: httpx.Client, path: str, **headers: str) -> tuple[httpx.Response, bytes]:
    """The response and its body as sent (no transparent decompression)."""
    with browser.stream("GET", path, headers=headers) as response:
        return response, b"".join(response.iter_raw())


def _cookie(response: httpx.Response, name: str) -> str:
    (value,) = [c for c in response.headers.get_list("set-cookie") if c.startswith(name + "=")]
    return value


# --- without a session ---------------------------------------------------------------------


def test_without_a_session_pages_go_to_sign_in_and_files_are_refused(
        anonymous: httpx.Client) -> None:
    res = anonymous.get("/")
    assert res.status_code == 303 and res.headers["location"] == "/login?next=%2F"
    # the study list's filters (patient names) never travel into the sign-in URL
    res = anonymous.get("/", params={"patientName": "DOE", "mrn": "123456"})
    assert res.status_code == 303, res.status_code
    assert res.headers["location"] == "/login?next=%2F"
    assert "DOE" not in res.headers["location"] and "123456" not in res.headers["location"]
    # a viewer URL is kept whole: back to the same study after sign-in
    res = anonymous.get("/viewer", params={"StudyInstanceUIDs": "1.2.3"})
    assert res.status_code == 303
    assert res.headers["location"] == "/login?next=" + quote(
        "/viewer?StudyInstanceUIDs=1.2.3", safe="")
    assert anonymous.get("/viewer/anything").headers["location"] == (
        "/login?next=%2Fviewer%2Fanything")
    for path in (f"/{HASHED_BUNDLE}", "/app-config.js", "/app.bundle.css",
                 "/assets/logo.svg", "/no-such.js"):
        res = anonymous.get(path)
        assert res.status_code == 401, (path, res.status_code)
        assert KEPT[HASHED_BUNDLE][:40] not in res.content
        assert b"window.config" not in res.content
    # the sign-in page itself keeps the strict policy
    login = anonymous.get("/login")
    assert login.status_code == 200
    assert login.headers["content-security-policy"] == security.CSP


# --- signed in as a physician ----------------------------------------------------------------


def test_index_with_the_viewer_policy_and_language(site: Site) -> None:
    res = site.doctor.get("/", headers={"accept-language": FRENCH})
    assert res.status_code == 200
    assert res.headers["content-type"] == "text/html; charset=utf-8"
    assert res.content == SERVED_INDEX
    assert "<title>pacsvault</title>" in res.text and "OHIF Viewer" not in res.text

    csp = res.headers["content-security-policy"]
    script_src = next(d for d in csp.split(";") if d.strip().startswith("script-src"))
    assert "'unsafe-eval'" in script_src and "'wasm-unsafe-eval'" in script_src
    assert "'unsafe-inline'" not in script_src
    assert set(re.findall(r"'sha256-([A-Za-z0-9+/=]+)'", csp)) == INLINE_HASHES
    for needle in ("default-src 'self'", "object-src 'none'", "frame-ancestors 'none'",
                   "base-uri 'self'", "worker-src 'self' blob:", "connect-src 'self'"):
        assert needle in csp, needle
    assert "http:" not in csp and "https:" not in csp and "*" not in csp
    assert res.headers["cross-origin-embedder-policy"] == "require-corp"
    assert res.headers["cross-origin-opener-policy"] == "same-origin"
    assert res.headers["cache-control"] == "no-store"
    assert res.headers["x-frame-options"] == "DENY"

    cookie = _cookie(res, "i18next")
    assert cookie.startswith("i18next=fr;"), cookie
    assert "Secure" in cookie and "samesite=strict" in cookie.lower() and "Path=/" in cookie
    english = site.doctor.get("/", headers={"accept-language": ENGLISH})
    assert _cookie(english, "i18next").startswith("i18next=en;")


def test_client_side_routes_answer_the_index(site: Site) -> None:
    for path in ("/viewer?StudyInstanceUIDs=1.2.3", "/viewer/anything", "/viewer",
                 "/localbasic", "/?patientName=DOE"):
        res = site.doctor.get(path)
        assert res.status_code == 200, (path, res.status_code)
        assert res.content == SERVED_INDEX, path
        assert "'unsafe-eval'" in res.headers["content-security-policy"], path


def test_app_config_points_at_our_dicomweb(site: Site) -> None:
    res = site.doctor.get("/app-config.js", headers={"accept-language": FRENCH})
    assert res.status_code == 200
    assert res.headers["content-type"].startswith("text/javascript")
    assert res.headers["cache-control"] == "no-store"
    text = res.text
    assert '"qidoRoot": "/dicom-web"' in text and '"wadoRoot": "/dicom-web"' in text
    assert '"investigationalUseDialog"' in text and "httpErrorHandler" in text
    assert not re.search(r"\w+://", text), re.search(r"\w+://", text)
    assert "document.documentElement.lang = \"fr\"" in text
    found = re.search(r"window\.config = (\{.*?\});\n", text, re.S)
    assert found
    config = json.loads(found.group(1))
    assert config["routerBasename"] == "/"
    assert config["investigationalUseDialog"] == {"option": "never"}
    (source,) = config["dataSources"]
    assert config["defaultDataSourceName"] == source["sourceName"]
    assert {source["configuration"][k] for k in ("qidoRoot", "wadoRoot", "wadoUriRoot")} == {
        "/dicom-web"}
    english = site.doctor.get("/app-config.js", headers={"accept-language": ENGLISH}).text
    assert "document.documentElement.lang = \"en\"" in english


def test_assets_gzip_cache_and_policy(site: Site) -> None:
    bundle = KEPT[HASHED_BUNDLE]
    res, body = _raw(site.doctor, f"/{HASHED_BUNDLE}", **{"accept-encoding": "gzip"})
    assert res.status_code == 200
    assert res.headers["content-encoding"] == "gzip"
    assert gzip.decompress(body) == bundle and len(body) < len(bundle)
    assert res.headers["content-type"].startswith("text/javascript")
    assert "accept-encoding" in res.headers["vary"].lower()
    assert res.headers["cache-control"] == "private, max-age=31536000, immutable"
    assert res.headers["cross-origin-resource-policy"] == "same-origin"
    # scripts also start workers: the viewer's policy, not the strict one
    assert "'unsafe-eval'" in res.headers["content-security-policy"]
    assert res.headers["cross-origin-embedder-policy"] == "require-corp"

    res, body = _raw(site.doctor, f"/{HASHED_BUNDLE}", **{"accept-encoding": "identity"})
    assert res.status_code == 200 and "content-encoding" not in res.headers
    assert body == bundle

    # a file name without a content hash: cached for an hour only
    res, body = _raw(site.doctor, "/init-service-worker.js", **{"accept-encoding": "identity"})
    assert res.status_code == 200 and body == KEPT["init-service-worker.js"]
    assert res.headers["cache-control"] == "private, max-age=3600"

    res, body = _raw(site.doctor, "/app.bundle.css", **{"accept-encoding": "gzip, br"})
    assert res.headers["content-encoding"] == "gzip"
    assert gzip.decompress(body) == KEPT["app.bundle.css"]
    assert res.headers["content-type"].startswith("text/css")

    # no twin (too small, or not compressible): the file itself, even when gzip is welcome
    for path, media in (("assets/logo.svg", "image/svg+xml"), ("assets/photo.png", "image/png"),
                        ("assets/noise.js", "text/javascript"), ("ohif-logo.woff2",
                                                                  "font/woff2")):
        res, body = _raw(site.doctor, f"/{path}", **{"accept-encoding": "gzip"})
        assert res.status_code == 200, path
        assert "content-encoding" not in res.headers, path
        assert body == KEPT[path], path
        assert res.headers["content-type"].startswith(media), path


def test_unknown_hidden_trimmed_and_outside_files_are_not_found(site: Site) -> None:
    (site.root / "secret.txt").write_text("outside the viewer")
    # Dot segments are refused outright, whatever the last segment looks like.
    for path in ("/..%2F..%2Fetc%2Fpasswd", "/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
                 "/assets/..%2F..%2Fsecret"):
        assert site.doctor.get(path).status_code == 404, path
    # A last segment without a dot is one of OHIF's client-side routes: the index page,
    # never a file; a 404 would do as well.
    for path in ("/_headers", "/_redirects"):
        res = site.doctor.get(path)
        assert res.status_code in (200, 404), (path, res.status_code)
        assert b"root:" not in res.content and b"outside the viewer" not in res.content
        if res.status_code == 200:
            assert res.content == SERVED_INDEX, path
    for path in ("/no-such.js", "/..%2Fsecret.txt", "/..%2F..%2Fetc%2Fhosts.txt",
                 "/assets%2F..%2F..%2Fsecret.txt", "/%2E%2E/secret.txt",
                 "/assets/..%2F..%2Fsecret.txt", f"/{MARKER}", "/.hidden", "/assets/.hidden",
                 "/x.js.map", "/ort/x.wasm", "/dicom-microscopy-viewer/a.js",
                 "/..%5Csecret.txt", f"/{HASHED_BUNDLE}/x.js"):
        res = site.doctor.get(path)
        assert res.status_code == 404, (path, res.status_code)
        assert b"outside the viewer" not in res.content and b"root:" not in res.content
        assert PINNED.integrity.encode() not in res.content
        assert res.headers["content-security-policy"] == security.CSP, path


def test_our_own_pages_keep_the_strict_policy(site: Site) -> None:
    for path in ("/account", "/no-such-page.js"):
        res = site.doctor.get(path)
        csp = res.headers["content-security-policy"]
        assert csp == security.CSP, (path, csp)
        assert "unsafe-eval" not in csp and "unsafe-inline" not in csp
    assert site.doctor.get("/account").status_code == 200
    admin = site.browsers["root"].get("/admin/health")
    assert admin.status_code == 200
    assert admin.headers["content-security-policy"] == security.CSP


def test_users_without_the_reader_role_go_to_their_pages(site: Site) -> None:
    for user, place in (("root", "/admin/health"), ("dpo", "/audit")):
        browser = site.browsers[user]
        for path in ("/", "/viewer?StudyInstanceUIDs=1.2.3", "/viewer/anything"):
            res = browser.get(path)
            assert res.status_code == 303, (user, path, res.status_code)
            assert res.headers["location"] == place, (user, path)
            assert b"<script" not in res.content


# --- not installed ---------------------------------------------------------------------------


def test_not_installed_says_how_to_install(site: Site, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    # an install of another release than the pinned one is not served either
    (tmp_path / "pkg").mkdir()
    tarball = build_tarball(tmp_path / "pkg" / "app.tgz")
    other = install(tmp_path / "other", tarball=tarball, release=fake_release(tarball))
    for directory in (empty, tmp_path / "missing", other):
        _use_viewer_dir(site, monkeypatch, directory)
        _served.cache_clear()
        for path in ("/", "/viewer?StudyInstanceUIDs=1.2.3"):
            res = site.doctor.get(path, headers={"accept-language": ENGLISH})
            assert res.status_code == 503, (directory, path, res.status_code)
            assert "pacsvault viewer install" in res.text, res.text
            assert res.headers["content-security-policy"] == security.CSP
        res = site.doctor.get(f"/{HASHED_BUNDLE}")
        assert res.status_code == 404, (directory, res.status_code)
    monkeypatch.undo()
    _served.cache_clear()
    assert site.doctor.get("/").status_code == 200  # back to the installed one


# --- defect 13 (issue 11): a planted ``.gz`` twin must not serve another file ----------------


def test_planted_gzip_twin_symlink_is_not_followed(site: Site, tmp_path: Path) -> None:
    """Someone with write access to the viewer directory plants ``<asset>.gz`` as a link to
    a secret file (or to a file of the install): the asset itself is served, never the
    link's target, with or without gzip welcome."""
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:$6$not-a-real-hash:19000:0:99999:7:::\n")
    inside = site.viewer_dir / f"{HASHED_BUNDLE}.gz"  # a real twin, inside the install
    planted = {
        site.viewer_dir / "assets" / "noise.js.gz": secret,  # escape to a file outside
        site.viewer_dir / "assets" / "logo.svg.gz": inside,  # a link inside the install
    }
    try:
        for link, target in planted.items():
            link.symlink_to(target)
        for path in ("assets/noise.js", "assets/logo.svg"):
            res, body = _raw(site.doctor, f"/{path}", **{"accept-encoding": "gzip"})
            assert res.status_code == 200, path
            assert "content-encoding" not in res.headers, path
            assert body == KEPT[path], path
            assert b"root:" not in body
    finally:
        for link in planted:
            link.unlink(missing_ok=True)
