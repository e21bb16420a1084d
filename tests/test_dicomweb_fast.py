"""Issue 17: the QIDO-RS searches without a path parameter skip FastAPI's routing
(``web/dicomweb_fast``), and nothing else changes.

Through the real application and HTTPS listener (in-process, fake clock): those requests
are the fast path's (counted, so that ``test_token_fastpath``'s refusals on
``/dicom-web/studies`` are its refusals too); every answer, success or refusal, is the
same, byte for byte and header for header, as the router's for the same request; a
revoked or expired token, a signed-out session, a disabled user and a user without the
role are refused at the very next request; a record that cannot be made durable still
means 503 and no answer; a search is still recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from starlette.types import Receive, Scope, Send

from pacsvault.audit import AuditUnavailable
from pacsvault.web import dicomweb_fast
from tests.helpers import make_vault
from tests.web_helpers import FakeClock, LocalWeb, local_web, page_csrf

PASSWORD = "lanterne-verte-au-bout-du-quai"
JSON = {"accept": "application/dicom+json"}


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWeb]:
    root = tmp_path_factory.mktemp("dwfast")
    vault_dir = make_vault(root / "v")
    with local_web(vault_dir, FakeClock()) as served:
        served.accounts.add_user("doc", ["physician"], PASSWORD)
        served.accounts.add_user("aud", ["auditor"], PASSWORD)
        source = Path(cast(str, get_testdata_file("CT_small.dcm")))
        served.vault.archive.store(source.read_bytes())
        yield served


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the fast path answered (refusals included)."""
    paths: list[str] = []
    original = dicomweb_fast.SearchFastPath.answer

    async def counted(self: dicomweb_fast.SearchFastPath, search: dicomweb_fast.Handler,
                      scope: Scope, receive: Receive, send: Send) -> None:
        paths.append(scope["path"])
        await original(self, search, scope, receive, send)

    monkeypatch.setattr(dicomweb_fast.SearchFastPath, "answer", counted)
    return paths


def _router_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dicomweb_fast, "SEARCHES", {})


def _get(web: LocalWeb, token: str, path: str, **headers: str) -> httpx.Response:
    with web.browser() as browser:
        auth = {"authorization": f"Bearer {token}"} if token else {}
        return browser.get(path, headers={**JSON, **auth, **headers})


def _same(a: httpx.Response, b: httpx.Response) -> None:
    assert a.status_code == b.status_code
    assert a.content == b.content
    drop = {"date", "content-length"}
    assert sorted((k, v) for k, v in a.headers.items() if k not in drop) == \
        sorted((k, v) for k, v in b.headers.items() if k not in drop)


def test_the_three_searches_take_the_fast_path_and_nothing_else(
        web: LocalWeb, taken: list[str]) -> None:
    token = web.accounts.create_token("doc", "1d").token
    for path in ("/dicom-web/studies", "/dicom-web/series", "/dicom-web/instances"):
        assert _get(web, token, path).status_code == 200
    assert taken == ["/dicom-web/studies", "/dicom-web/series", "/dicom-web/instances"]
    taken.clear()
    study = str(dcmread(cast(str, get_testdata_file("CT_small.dcm"))).StudyInstanceUID)
    assert _get(web, token, f"/dicom-web/studies/{study}/series").status_code == 200
    assert _get(web, token, "/dicom-web/studies/").status_code in (307, 404)
    with web.browser() as browser:
        head = browser.head("/dicom-web/studies",
                            headers={**JSON, "authorization": f"Bearer {token}"})
    assert head.status_code == 405
    assert taken == []


@pytest.mark.parametrize(("who", "path", "extra"), [
    ("doc", "/dicom-web/studies", {}),
    ("doc", "/dicom-web/studies?PatientName=*&includefield=all", {}),
    ("doc", "/dicom-web/series?Modality=CT&limit=1", {}),
    ("doc", "/dicom-web/instances?offset=0", {}),
    ("doc", "/dicom-web/studies?StudyDate=19000101-19000102", {}),  # no match: []
    ("doc", "/dicom-web/studies?fuzzymatching=true", {}),  # Warning header
    ("doc", "/dicom-web/studies?NoSuchKeyword=1", {}),  # 400
    ("doc", "/dicom-web/studies", {"accept": "image/png"}),  # 406
    ("aud", "/dicom-web/studies", {}),  # 403: valid identity, no role
    ("", "/dicom-web/studies", {}),  # 401: no credentials
    ("bad", "/dicom-web/studies", {}),  # 401: not a token
    ("", "/dicom-web/studies", {"accept": "text/html"}),  # 401 as the HTML page
])
def test_answers_equal_the_routers(web: LocalWeb, monkeypatch: pytest.MonkeyPatch,
                                   taken: list[str], who: str, path: str,
                                   extra: dict[str, str]) -> None:
    token = {"": "", "bad": "pv_not-a-token"}.get(who)
    if token is None:
        token = web.accounts.create_token(who, "1d").token
        _get(web, token, path)  # first use from this address recorded by the full check
    fast = _get(web, token, path, **extra)
    assert taken, "the fast path answered"
    _router_only(monkeypatch)
    routed = _get(web, token, path, **extra)
    _same(fast, routed)


def test_revoked_and_expired_tokens_refused_at_the_next_request(
        web: LocalWeb, taken: list[str]) -> None:
    revoked = web.accounts.create_token("doc", "1d")
    short = web.accounts.create_token("doc", "1d")
    for issued in (revoked, short):
        for _ in range(2):  # the second through the event-loop token check
            assert _get(web, issued.token, "/dicom-web/studies").status_code == 200
    assert web.vault.accounts.revoke_token(revoked.token_id)  # another handle, same index
    assert _get(web, revoked.token, "/dicom-web/studies").status_code == 401
    web.clock.advance(2 * 86400)
    assert _get(web, short.token, "/dicom-web/studies").status_code == 401
    assert len(taken) == 6


def test_signed_out_and_disabled_sessions_refused(web: LocalWeb, taken: list[str]) -> None:
    web.accounts.add_user("ses", ["physician"], PASSWORD)
    with web.browser() as browser:
        signed = web.sign_in(browser, "ses", PASSWORD)
        assert browser.get("/dicom-web/studies", headers=JSON).status_code == 200
        web.vault.accounts.disable("ses")
        assert browser.get("/dicom-web/studies", headers=JSON).status_code == 401
        web.vault.accounts.enable("ses")
    with web.browser() as browser:
        web.sign_in(browser, "ses", PASSWORD, signed.authenticator)
        assert browser.get("/dicom-web/studies", headers=JSON).status_code == 200
        out = browser.post("/logout", data={"csrf": page_csrf(browser)})
        assert out.status_code in (200, 303)
        assert browser.get("/dicom-web/studies", headers=JSON).status_code == 401
    assert len(taken) == 4


def test_an_access_that_cannot_be_recorded_is_refused(
        web: LocalWeb, taken: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    token = web.accounts.create_token("doc", "1d").token
    assert _get(web, token, "/dicom-web/studies").status_code == 200
    recorder = web.vault.recorder
    original: Callable[..., Any] = recorder.emit

    def failing(event: Any, *args: Any, **kwargs: Any) -> Any:
        if event.action == "dicomweb.search":
            raise AuditUnavailable("test: the trail cannot be written")
        return original(event, *args, **kwargs)

    monkeypatch.setattr(recorder, "emit", failing)
    # the record tried on the event loop first (``Recorder.try_emit``): refused there too
    monkeypatch.setattr(recorder, "try_emit", failing)
    refused = _get(web, token, "/dicom-web/studies")
    assert refused.status_code == 503
    assert b"0020000D" not in refused.content and refused.headers["retry-after"] == "60"
    assert taken[-1] == "/dicom-web/studies"


def test_a_search_is_recorded(web: LocalWeb, taken: list[str]) -> None:
    seen: list[str] = []
    recorder = web.vault.recorder
    original: Callable[..., Any] = recorder.emit

    def spy(event: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(event, *args, **kwargs)  # returns once durable
        seen.append(event.action)
        return result

    tried: Callable[..., Any] = recorder.try_emit

    def try_spy(event: Any) -> bool:
        done = bool(tried(event))  # True once durable; False: ``emit`` follows
        if done:
            seen.append(event.action)
        return done

    token = web.accounts.create_token("doc", "1d").token
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recorder, "emit", spy)
        patch.setattr(recorder, "try_emit", try_spy)
        assert _get(web, token, "/dicom-web/studies").status_code == 200
    # once, on the event loop or in a worker thread
    assert seen.count("dicomweb.search") == 1 and taken == ["/dicom-web/studies"]
