"""Share links for an outside colleague (issue 19, part 2), on the real HTTPS server.

One vault and server per module: two studies stored in-process (one shared, one not), a
physician who makes links on the web page. The colleague is a fresh browser with no account:
the link and the code open the one study in OHIF (a test build of the viewer installed), whose
DICOMweb reads the share session reaches for that study only; it reaches nothing
else (every route of the application is swept with it); wrong codes are refused and
throttled; expired (links made with a clock in the past) and revoked links are refused;
every opening is in the trail.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import re
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from sqlalchemy import select

from pacsvault.deidentify.links import LinkTable
from pacsvault.index.deployment_state import LinkRow
from pacsvault.sharing.links import MAX_FAILURES, ShareLinks
from pacsvault.storage.erasure import Eraser
from pacsvault.viewer import install
from tests import corpus
from tests.harness.backends import Backend
from tests.helpers import Server, VaultDir, events, make_vault, start_server
from tests.test_erasure import Admins, make, store
from tests.test_viewer_dist import build_tarball, fake_release
from tests.test_viewer_serving import _mark_as_pinned
from tests.test_web_routes import app_routes
from tests.web_helpers import FakeClock, client, local_web, page_csrf, sign_in

PHYSICIAN, PASSWORD = "dr-house", "radiographie-du-genou-droit-du-matin"
LINK_RE = re.compile(r'<code id="share-url">https://[^/]+/share/([A-Za-z0-9_-]+)</code>')
CODE_RE = re.compile(r'<code id="share-code" class="secret">([A-Z0-9-]+)</code>')


@dataclass
class World:
    vault: VaultDir
    server: Server
    shared: corpus.CorpusFile
    other: corpus.CorpusFile
    doctor: httpx.Client
    csrf: str
    last: int = 0

    def browser(self) -> httpx.Client:
        return client(self.server.https_port, self.vault.data / "tls" / "ca.crt")

    def share(self, **form: str) -> tuple[str, str]:
        """A new link to the shared study, made on the physician's page: (link id, code);
        ``self.last`` is its number (the newest on the page)."""
        res = self.doctor.post("/account/shares", data={
            "csrf": self.csrf, "study": self.shared.study_uid, "days": "3", **form})
        assert res.status_code == 200, res.text[:500]
        assert self.shared.study_uid not in res.headers.get("location", "")
        link, code = LINK_RE.search(res.text), CODE_RE.search(res.text)
        assert link and code, res.text[:3000]
        self.last = max(int(p) for p in re.findall(r'name="share" value="(\d+)"', res.text))
        return link.group(1), code.group(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("share")
    vault = make_vault(root / "v")
    files = corpus.build(root / "corpus")
    shared, other = files[0], files[12]  # CT, synthetic CR: two patients, two studies
    v = vault.open()
    try:
        v.accounts.add_user(PHYSICIAN, ["physician"], PASSWORD, by="test")
        for f in (shared, other):
            v.archive.store(f.path.read_bytes(), source_ae="TEST")
    finally:
        v.close()
    tarball = build_tarball(root / "app.tgz")  # OHIF's test build
    viewer_dir = install(root / "ohif", tarball=tarball, release=fake_release(tarball))
    _mark_as_pinned(viewer_dir)
    vault.set_toml("web", "viewer_dir", json.dumps(str(viewer_dir)))
    server = start_server(vault)
    doctor = client(server.https_port, vault.data / "tls" / "ca.crt")
    try:
        sign_in(doctor, PHYSICIAN, PASSWORD)
        yield World(vault, server, shared, other, doctor, page_csrf(doctor))
    finally:
        doctor.close()
        server.stop()


@contextlib.contextmanager
def _open(world: World, link: str, code: str) -> Iterator[httpx.Client]:
    """A colleague's browser that typed the code (lower case, with its dash: accepted)."""
    with world.browser() as colleague:
        assert colleague.get(f"/share/{link}").status_code == 200
        res = colleague.post(f"/share/{link}", data={"code": code.lower()})
        assert res.status_code == 303 and res.headers["location"] == f"/share/{link}/study"
        yield colleague


def test_the_code_opens_the_one_study(world: World) -> None:
    link, code = world.share(download="1")
    pk = world.last
    assert world.shared.study_uid not in link and len(link) >= 32
    with _open(world, link, code) as colleague:
        # the study in OHIF: /viewer, no UID in any URL the server sees
        study = colleague.get(f"/share/{link}/study")
        assert study.status_code == 303 and study.headers["location"] == "/viewer"
        viewer = _viewer_page(colleague, "/viewer")
        assert viewer.status_code == 200 and "<html" in viewer.text.lower()
        assert world.shared.study_uid not in viewer.text
        # the rendered images (the page without an installed viewer) still answer
        image = colleague.get(f"/share/{link}/image/0")
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        assert colleague.get(f"/share/{link}/image/99").status_code == 404
        zipped = colleague.get(f"/share/{link}/download")
        assert zipped.status_code == 200
        with zipfile.ZipFile(io.BytesIO(zipped.content)) as z:
            [name] = z.namelist()
            assert dcmread(io.BytesIO(z.read(name))).StudyInstanceUID == world.shared.study_uid
        # the code worked once: another browser cannot use it again
        again = world.browser()
        assert again.get(f"/share/{link}").status_code == 404
        assert again.post(f"/share/{link}", data={"code": code}).status_code == 404
        again.close()
    opened = [e for e in events(world.vault) if e["action"] in ("share.opened",
                                                                "share.export")]
    whats = [e["what"] for e in opened if e["share"] == pk]
    assert whats == ["viewer", "image", "download"]
    for e in opened:
        assert e["study_uids"] == [world.shared.study_uid]
        assert world.shared.study_uid not in repr({k: v for k, v in e.items()
                                                   if k != "study_uids"})
    accepted = events(world.vault, "share.code.accepted")
    assert accepted and accepted[-1]["address"] == "127.0.0.1"


def test_share_session_reaches_nothing_else(world: World) -> None:
    """Every route of the application, with the share session's cookie: the share routes of
    its own link answer, nothing else does (the other study is not reachable either)."""
    link, code = world.share()
    other_link, _ = world.share()
    routes = app_routes(world.vault)
    with _open(world, link, code) as colleague:
        assert colleague.get(f"/share/{link}/download").status_code == 403  # not granted
        checked = 0
        for route in routes:
            own = route.path.startswith("/share/{link}")
            # another link's session pages too (its code form is public: not swept, a
            # POST there would count as a wrong code)
            entry = route.path == "/share/{link}"
            for target in ((link, other_link) if own and not entry else (link,)):
                url = route.url.replace("/share/" + "L" * 40, "/share/" + target)
                if own and target == link and route.path.endswith("/signout"):
                    continue  # it would end this session (tested below)
                if route.method == "GET":
                    res = colleague.get(url, headers={"accept": "*/*"})
                else:
                    res = colleague.request(route.method, url, data={})
                checked += 1
                if own and target == link:
                    continue  # its own pages: tested above
                if own:  # another link's pages: this session is not theirs
                    # (403: a POST without the pre-sign-in session's CSRF token)
                    assert res.status_code in (401, 403, 404), (url, res.status_code)
                    continue
                if (route.method, route.path) in {("GET", "/login"), ("GET", "/static/{name}"),
                                                  ("POST", "/language")}:
                    continue  # the public sign-in steps (ANONYMOUS_OK)
                if route.dicomweb and route.method == "GET":  # reads: the one study only
                    if "{study}" in route.path:
                        assert res.status_code == 404, (url, res.status_code)  # another
                    else:
                        assert res.status_code == 200, (url, res.status_code)
                        assert _studies(res) <= {world.shared.study_uid}, url
                    continue
                redirected = res.status_code == 303 and res.headers["location"].startswith(
                    "/login")
                assert res.status_code in (401, 403) or redirected, (route, res.status_code)
        assert checked > 40
        # the other study through DICOMweb: nothing, whatever the query
        other = world.other.study_uid
        for path in (f"/dicom-web/studies/{other}/metadata",
                     f"/dicom-web/studies/{other}/series",
                     f"/dicom-web/studies?PatientID={world.other.patient_id}",
                     f"/dicom-web/studies?StudyInstanceUID={other}",
                     f"/dicom-web/series?StudyInstanceUID={other}"):
            res = colleague.get(path, headers={"accept": "application/dicom+json"})
            assert res.status_code in (200, 404), (path, res.status_code)
            assert res.status_code == 404 or _studies(res) <= {world.shared.study_uid}
            assert world.other.patient_id not in res.text and other not in res.text


def _viewer_page(browser: httpx.Client, url: str) -> httpx.Response:
    """OHIF's page: its policy is the viewer's (test_viewer_serving checks it), not the
    strict one the client's hook expects of every other page."""
    hooks = browser.event_hooks
    browser.event_hooks = {"request": [], "response": []}
    try:
        return browser.get(url, headers={"accept": "text/html"})
    finally:
        browser.event_hooks = hooks


def _studies(res: httpx.Response) -> set[str]:
    """The StudyInstanceUIDs of a DICOM JSON answer."""
    return {a["0020000D"]["Value"][0] for a in res.json() if "0020000D" in a}


def test_share_session_in_ohif_on_the_one_study(world: World) -> None:
    """The share session's OHIF: its configuration names the one study, no study list, no
    account menu; QIDO returns exactly that study whatever the query, WADO reads it and
    refuses the other, STOW is refused; every read is the share's in the trail; the viewer
    URL's query (the UID, client-side) is kept by no log and no record."""
    link, code = world.share(download="1")
    pk, uid = world.last, world.shared.study_uid
    with _open(world, link, code) as colleague:
        config = colleague.get("/app-config.js")
        assert config.status_code == 200 and config.headers["cache-control"] == "no-store"
        found = re.search(r"var pv = (\{.*?\});\n", config.text)
        assert found
        block = json.loads(found.group(1))
        assert block["share"] == {
            "study": uid, "entry": f"/share/{link}", "signOut": f"/share/{link}/signout",
            "download": f"/share/{link}/download", "downloadLabel": "Download the study (ZIP)"}
        assert block["admin"] is False
        assert '"showStudyList": false' in config.text
        # OHIF opens /viewer?StudyInstanceUIDs=... client-side; a reload sends that query
        page = _viewer_page(colleague, f"/viewer?StudyInstanceUIDs={uid}")
        assert page.status_code == 200
        json_accept = {"accept": "application/dicom+json"}
        for query in ("", "?PatientName=*", f"?StudyInstanceUID={world.other.study_uid}",
                      "?limit=100&includefield=all"):
            res = colleague.get(f"/dicom-web/studies{query}", headers=json_accept)
            assert res.status_code == 200, query
            assert _studies(res) <= {uid} and world.other.patient_id not in res.text
        assert _studies(colleague.get("/dicom-web/studies", headers=json_accept)) == {uid}
        series = colleague.get(f"/dicom-web/studies/{uid}/series", headers=json_accept)
        assert series.status_code == 200 and series.json()
        meta = colleague.get(f"/dicom-web/studies/{uid}/metadata", headers=json_accept)
        assert meta.status_code == 200
        other = world.other.study_uid
        assert colleague.get(f"/dicom-web/studies/{other}/metadata",
                             headers=json_accept).status_code == 404
        assert colleague.post("/dicom-web/studies", content=b"").status_code == 401
        # the share's sign-out: the cookie goes, then nothing answers it
        kept = dict(colleague.cookies)
        out = colleague.post(f"/share/{link}/signout", data={"csrf": block["csrf"]})
        assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]
        assert colleague.get("/dicom-web/studies").status_code == 401
        # the server ended it: the old cookie, replayed, opens nothing
        with world.browser() as replay:
            replay.cookies.update(kept)
            assert replay.get("/dicom-web/studies").status_code == 401
            assert replay.get(f"/share/{link}/study").status_code == 401
    reads = [e for e in events(world.vault) if e.get("share") == pk
             and str(e["action"]).startswith("dicomweb.")]
    assert {e["action"] for e in reads} == {"dicomweb.search", "dicomweb.retrieve"}
    for e in reads:
        assert e["user"] == f"share:{pk}"
        studies = e["study_uids"]
        assert isinstance(studies, list) and set(studies) <= {uid}
    viewer = [e for e in events(world.vault, "share.opened")
              if e["share"] == pk and e["what"] == "viewer"]
    assert len(viewer) == 1
    for e in events(world.vault):
        assert uid not in repr({k: v for k, v in e.items()
                                if k not in ("study_uids", "sop_uids")})
    for log in world.vault.root.rglob("*.log"):
        assert uid.encode() not in log.read_bytes(), log


def test_wrong_code_refused_and_throttled(world: World) -> None:
    link, code = world.share()
    colleague = world.browser()
    statuses = []
    for _ in range(7):
        res = colleague.post(f"/share/{link}", data={"code": "AAAAA-AAAAA"})
        statuses.append(res.status_code)
        if res.status_code == 429:
            break
    assert statuses[0] == 400 and statuses[-1] == 429, statuses
    wait = int(res.headers["retry-after"])
    assert 1 <= wait <= 10
    # while throttled, even the right code is not evaluated
    assert colleague.post(f"/share/{link}", data={"code": code}).status_code == 429
    time.sleep(wait + 0.2)
    res = colleague.post(f"/share/{link}", data={"code": code})
    assert res.status_code == 303, res.status_code
    assert colleague.get(f"/share/{link}/study").status_code == 303
    colleague.close()
    failed = [e for e in events(world.vault, "auth.login.failed")
              if e.get("factor") == "share-code"]
    assert len(failed) >= len(statuses)


def test_expired_and_revoked_links_refused(world: World) -> None:
    # expired: made with a clock 31 days in the past, valid 30 days
    v = world.vault.open()
    try:
        past = dt.datetime.now(dt.UTC) - dt.timedelta(days=31)
        old = ShareLinks(v.sessions, v.recorder, v.accounts.throttle, v.accounts.hasher,
                         hold=v.accounts.recorder.holding,
                         clock=lambda: past).create(PHYSICIAN, world.shared.study_uid,
                                                    days=30)
    finally:
        v.close()
    colleague = world.browser()
    assert colleague.get(f"/share/{old.link_id}").status_code == 404
    assert colleague.post(f"/share/{old.link_id}", data={"code": old.code}).status_code == 404
    # revoked: opened first, then revoked by the physician from the page
    link, code = world.share()
    with _open(world, link, code) as opened:
        assert opened.get(f"/share/{link}/study").status_code == 303
        assert opened.get("/dicom-web/studies",
                          headers={"accept": "application/dicom+json"}).status_code == 200
        newest = world.last
        res = world.doctor.post("/account/shares/revoke",
                                data={"csrf": world.csrf, "share": str(newest)})
        assert res.status_code == 303
        # nor the viewer and DICOMweb: the revoked session is no one
        assert opened.get("/dicom-web/studies").status_code == 401
        # a reload of the viewer (its URL names the study), of the study page or of the
        # link: the link's own page says it was revoked, not the staff sign-in page
        ended = f"/share/{link}/ended"
        for url in (f"/viewer?StudyInstanceUIDs={world.shared.study_uid}", "/viewer", "/",
                    f"/share/{link}/study", f"/share/{link}"):
            res = _viewer_page(opened, url)
            assert res.status_code == 303 and res.headers["location"] == ended, url
        page = opened.get(ended)
        assert page.status_code == 410 and 'data-reason="revoked"' in page.text
        assert "This share link was revoked" in page.text
        assert "Ask the physician who shared it" in page.text
        french = opened.get(ended, headers={"accept-language": "fr-FR,fr;q=0.9"})
        assert "Ce lien de partage a été révoqué" in french.text
        assert world.shared.study_uid not in page.text + french.text
        # the reason is the session holder's only: another browser learns nothing
        other = colleague.get(ended)
        assert other.status_code == 404 and 'data-reason=""' in other.text
    assert events(world.vault, "share.revoked")[-1]["share"] == newest
    for log in world.vault.root.rglob("*.log"):
        assert world.shared.study_uid.encode() not in log.read_bytes(), log
    colleague.close()


def test_fake_clock_expiry_and_limits(world: World) -> None:
    now = [dt.datetime(2030, 1, 1, tzinfo=dt.UTC)]
    v = world.vault.open()
    try:
        links = ShareLinks(v.sessions, v.recorder, v.accounts.throttle, v.accounts.hasher,
                         hold=v.accounts.recorder.holding,
                           clock=lambda: now[0])
        made = links.create(PHYSICIAN, world.shared.study_uid, days=2)
        opening = links.open(made.link_id, made.code, "127.0.0.9")
        assert opening.ok
        now[0] += dt.timedelta(days=2) - dt.timedelta(seconds=1)
        assert links.resolve(made.link_id, opening.session) is not None
        assert links.resolve(made.link_id, opening.session + "x") is None
        assert links.ended(made.link_id, opening.session) == ""  # still open
        now[0] += dt.timedelta(seconds=1)
        assert links.resolve(made.link_id, opening.session) is None
        # why, told to that session only
        assert links.ended(made.link_id, opening.session) == "expired"
        assert links.ended(made.link_id, opening.session + "x") == ""
        assert links.ended(made.link_id + "x", opening.session) == ""
        links.revoke(made.share.pk, PHYSICIAN)
        assert links.ended(made.link_id, opening.session) == "revoked"
        with pytest.raises(ValueError):
            links.create(PHYSICIAN, world.shared.study_uid, days=31)
    finally:
        v.close()


def test_wrong_codes_after_use_do_not_end_the_open_session(world: World) -> None:
    """Once the code is used, guesses on the link id count nothing: they must not close
    the colleague's session (the link's failure cap is for guessing an unused code)."""
    v = world.vault.open()
    try:
        links = ShareLinks(v.sessions, v.recorder, v.accounts.throttle, v.accounts.hasher,
                           hold=v.accounts.recorder.holding)
        made = links.create(PHYSICIAN, world.shared.study_uid, days=2)
        opening = links.open(made.link_id, made.code, "127.0.0.9")
        assert opening.ok
        for n in range(MAX_FAILURES + 2):  # each from its own address: no throttle
            assert not links.open(made.link_id, "AAAAA-AAAAA", f"127.0.1.{n + 1}").ok
        row = links._row(made.link_id)
        assert row is not None and row.failures == 0
        assert links.resolve(made.link_id, opening.session) is not None
        assert links.ended(made.link_id, opening.session) == ""
    finally:
        v.close()


def test_link_expiring_while_the_viewer_is_open(world: World,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """The application in-process with a fake clock (``local_web``) over the same vault:
    the colleague has OHIF open, the link's last day passes; a reload of the viewer goes to
    the link's page saying it expired (English, French), not to the staff sign-in; no UID
    in that URL or in any log line."""
    uid = world.shared.study_uid
    caplog.set_level(logging.DEBUG)
    clock = FakeClock()
    with local_web(world.vault, clock) as web:
        accounts = web.accounts
        made = ShareLinks(web.vault.sessions, web.vault.recorder, accounts.throttle,
                          accounts.hasher, clock=clock, hold=accounts.recorder.holding
                          ).create(PHYSICIAN, uid, days=1)
        link = made.link_id
        with web.browser() as colleague:
            assert colleague.get(f"/share/{link}").status_code == 200
            assert colleague.post(f"/share/{link}", data={"code": made.code}
                                  ).status_code == 303
            reload = f"/viewer?StudyInstanceUIDs={uid}"  # OHIF's URL for the study
            assert _viewer_page(colleague, reload).status_code == 200
            clock.advance(dt.timedelta(days=1).total_seconds() - 1)
            assert _viewer_page(colleague, reload).status_code == 200
            clock.advance(1)
            res = _viewer_page(colleague, reload)
            assert res.status_code == 303
            assert res.headers["location"] == f"/share/{link}/ended"
            page = colleague.get(res.headers["location"])
            assert page.status_code == 410 and 'data-reason="expired"' in page.text
            assert "This share link has expired" in page.text
            french = colleague.get(f"/share/{link}/ended",
                                   headers={"accept-language": "fr"})
            assert "Ce lien de partage a expiré" in french.text
            assert "Demandez un nouveau lien au médecin" in french.text
            # a second reload: the same page (the stale cookie opens nothing but says why)
            assert _viewer_page(colleague, "/").headers["location"] == f"/share/{link}/ended"
            assert colleague.get("/dicom-web/studies").status_code == 401
    for record in caplog.records:  # the server's (the test's HTTP client logs its URLs)
        if not record.name.startswith(("httpx", "httpcore")):
            assert uid not in record.getMessage() and link not in record.getMessage()


def test_de_identified_share(world: World, tmp_path: Path) -> None:
    link, code = world.share(download="1", profile="basic", project="second-opinion")
    with _open(world, link, code) as colleague:
        zipped = colleague.get(f"/share/{link}/download")
        assert zipped.status_code == 200
        with zipfile.ZipFile(io.BytesIO(zipped.content)) as z:
            names = z.namelist()
            assert "README.txt" in names
            [dcm] = [n for n in names if n.endswith(".dcm")]
            raw = z.read(dcm)
    for secret in (world.shared.patient_name, world.shared.patient_id,
                   world.shared.study_uid, world.shared.sop_uid):
        assert secret.encode() not in raw
    assert dcmread(io.BytesIO(raw)).PatientIdentityRemoved == "YES"


def test_listed_on_account_and_health_pages(world: World) -> None:
    world.share()
    account = world.doctor.get("/account")
    assert account.status_code == 200 and 'id="account-share-links"' in account.text
    assert world.shared.study_uid not in account.text
    with world.browser() as admin:
        sign_in(admin, world.vault.admin_name, world.vault.admin_password)
        health = admin.get("/admin/health")
        assert health.status_code == 200
        assert 'id="health-share-links"' in health.text and PHYSICIAN in health.text
        assert world.shared.study_uid not in health.text
        # an administrator who is not a physician has no share section on the account page
        assert 'id="shares"' not in admin.get("/account").text


def test_physician_downloads_a_study_de_identified(world: World) -> None:
    """The web action: a POST answering a ZIP built in memory; burned-in objects (the US
    image of the corpus) refused until the physician ticks the confirmation."""
    us = corpus.build(world.vault.root / "us-corpus")[11]
    assert dcmread(us.path).get("Modality") == "US"
    v = world.vault.open()
    try:
        v.archive.store(us.path.read_bytes(), source_ae="TEST")
    finally:
        v.close()
    form = {"csrf": world.csrf, "study": us.study_uid, "profile": "research",
            "project": "teaching-2026"}
    refused = world.doctor.post("/account/deidentified", data=form)
    assert refused.status_code == 400 and "pixels" in refused.text
    res = world.doctor.post("/account/deidentified", data={**form, "accept_burned_in": "1"})
    assert res.status_code == 200 and res.headers["content-type"] == "application/zip"
    assert res.headers["cache-control"] == "no-store"
    with zipfile.ZipFile(io.BytesIO(res.content)) as z:
        readme = z.read("README.txt").decode()
        [dcm] = [n for n in z.namelist() if n.endswith(".dcm")]
        raw = z.read(dcm)
    assert "PSEUDONYMISED, NOT ANONYMOUS" in readme and "1 object(s) were flagged" in readme
    for secret in (us.patient_name, us.patient_id, us.birth_date, us.study_uid, us.sop_uid):
        assert secret.encode() not in raw
    found = events(world.vault, "export.deidentified")[-1]
    assert (found["project"], found["destination"], found["user"]) == (
        "teaching-2026", "web download", PHYSICIAN)


@pytest.mark.slow
def test_links_on_both_index_backends(backend: Backend,
                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    """The table of revision 0006 on SQLCipher and on a sealed PostgreSQL index: the study
    UID is never in clear in a PostgreSQL row; link and session only as digests."""
    made = backend.new_vault(tmp_path_factory.mktemp("share-backend") / "v")
    made.set_toml("retention", "solo_practice", "true")
    v = made.open()
    try:
        links = ShareLinks(v.sessions, v.recorder, v.accounts.throttle, v.accounts.hasher,
                           hold=v.accounts.recorder.holding)
        study = "1.2.826.0.1.3680043.10.999.77"
        made_link = links.create(PHYSICIAN, study, days=1)
        opening = links.open(made_link.link_id, made_link.code, "127.0.0.1")
        share = links.resolve(made_link.link_id, opening.session)
        assert share is not None and share.study == study
        with v.engine.connect() as conn:
            [row] = conn.exec_driver_sql(
                "SELECT study, link_key, session_key, code_hash FROM share_links").all()
        raw = b"".join(bytes(c) if isinstance(c, (bytes, memoryview)) else str(c).encode()
                       for c in row)
        for secret in (made_link.link_id, opening.session, made_link.code.replace("-", "")):
            assert secret.encode() not in raw
        if v.engine.dialect.name != "sqlite":
            assert study.encode() not in raw
        # a patient's erasure takes the links to their studies with it, not the others
        erased = make("PVSHARE1")
        store(v, erased)
        gone = links.create(PHYSICIAN, erased.study, days=1)
        table = LinkTable(v, "share-test")
        table.add({"PV-ERASED": "PVSHARE1", "PV-KEPT": "PVOTHER9"})
        eraser = Eraser(v)
        eraser.admins = Admins("alice")  # type: ignore[method-assign]
        eraser.erase_solo("PVSHARE1", "", "retention over, share test", "retention-ended",
                          "PVSHARE1", actor="alice", via="test")
        assert [s.pk for s in links.mine(PHYSICIAN)] == [made_link.share.pk]
        assert not links.exists(gone.link_id)
        # and a de-identification project's link table forgets the patient
        assert table.read() == {"PV-KEPT": "PVOTHER9"}
        with v.engine.connect() as conn:  # its line is gone from the index, not only hidden
            blobs = list(conn.execute(select(LinkRow.blob).where(
                LinkRow.project == table.project)).scalars())
        assert len(blobs) == 1
    finally:
        v.close()
