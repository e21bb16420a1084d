"""Route inventory: every route of the real application, called on the real HTTPS server.

The routes come from ``create_app`` itself (walked, not listed by hand), so a route added
later is covered without touching this file. For each one:

* it declares who may use it (a ``deps.RoleRequirement`` among its dependencies), unless it
  is one of the sign-in steps listed in ``PUBLIC``;
* without credentials it answers 401, or 303 to /login (pages), except the sign-in form,
  its POST (403: no session, so no CSRF token) and the style sheet (``ANONYMOUS_OK``);
* with an API token it answers 401 everywhere but under /dicom-web, where the token of a
  user holding the route's role gets through (neither 401 nor 403);
* with the wrong role (a token or a signed-in session of a user without it) it answers 403.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from pacsvault.web.app import create_app
from pacsvault.web.deps import RoleRequirement
from tests.helpers import Server, VaultDir, make_vault, start_server
from tests.web_helpers import client, page_csrf, sign_in

DICOMWEB = "/dicom-web"
PASSWORDS = {"phys": "radio-du-matin-sur-la-plage", "aud": "registre-des-acces-du-cabinet"}
ROLES = {"admin": "admin", "phys": "physician", "aud": "auditor"}
# Routes that need no credentials (the sign-in steps work on the pre-sign-in session).
PUBLIC = {
    ("GET", "/static/{name}"), ("POST", "/language"),
    ("GET", "/login"), ("POST", "/login"),
    ("GET", "/login/second-factor"), ("POST", "/login/second-factor"),
    ("GET", "/login/enrol"), ("POST", "/login/enrol"),
    ("POST", "/login/passkey/options"), ("POST", "/login/passkey/verify"),
    ("POST", "/login/enrol/passkey/options"), ("POST", "/login/enrol/passkey/verify"),
    ("POST", "/logout"),
    # sealed mode's unlock page (sealed/web.py); once unsealed it sends to /login
    ("GET", "/unseal"), ("POST", "/unseal"),
    # share links (issue 19): the code form, then the link's own share session
    # (tests/test_share_links.py sweeps every route with that session)
    ("GET", "/share/{link}"), ("POST", "/share/{link}"), ("GET", "/share/{link}/study"),
    ("GET", "/share/{link}/image/{n}"), ("GET", "/share/{link}/download"),
    ("POST", "/share/{link}/signout"), ("GET", "/share/{link}/ended"),
}
# Without credentials, every route answers 401 or 303 → /login, except these.
ANONYMOUS_OK = {
    ("GET", "/login"): 200,  # the sign-in form itself
    ("POST", "/login"): 403,  # no session cookie, so no CSRF token to match: refused
    ("GET", "/static/{name}"): 200,  # the style sheet
    ("POST", "/language"): 303,  # the sign-in pages' language switch: back to /login
    ("GET", "/share/{link}"): 404,  # no such share link (issue 19)
    ("POST", "/share/{link}"): 404,
    ("GET", "/share/{link}/ended"): 404,  # no share session of it: "not valid"
}
# The OHIF viewer (``/``, ``/viewer``, its files through a catch-all route) checks the
# session itself and is tested with it; this inventory covers every other route.
VIEWER_MODULE = "pacsvault.web.viewer"
PARAMS = {
    "name": "nobody", "token_id": "0123456789abcdef", "study": "1.2.826.0.1.3680043.10.999.1",
    "series": "1.2.826.0.1.3680043.10.999.1.1", "sop": "1.2.826.0.1.3680043.10.999.1.1.1",
    "frames": "1", "path": "00100010", "link": "L" * 40, "n": "0",
}


@dataclass(frozen=True)
class RouteInfo:
    method: str
    path: str
    requirement: RoleRequirement | None

    @property
    def url(self) -> str:
        url = self.path
        if self.path == "/static/{name}":
            return "/static/style.css"
        for name, value in PARAMS.items():
            url = url.replace("{" + name + "}", value).replace("{" + name + ":path}", value)
        assert "{" not in url, f"no test value for a parameter of {self.path}"
        return url

    @property
    def dicomweb(self) -> bool:
        return self.path.startswith(DICOMWEB)


def _requirements(dependant: Any) -> Iterator[RoleRequirement]:
    for sub in getattr(dependant, "dependencies", []):
        if isinstance(sub.call, RoleRequirement):
            yield sub.call
        yield from _requirements(sub)


def app_routes(vault: VaultDir) -> list[RouteInfo]:
    """Every (method, path) of the real application, with its role requirement."""
    v = vault.open()
    try:
        app = create_app(v, v.accounts)
        try:  # FastAPI >= 0.16x keeps included routers as such; older ones flatten them
            from fastapi.routing import iter_route_contexts
            routes: list[Any] = list(iter_route_contexts(app.routes))
        except ImportError:
            routes = list(app.routes)
        found: list[RouteInfo] = []
        for route in routes:
            if getattr(getattr(route, "endpoint", None), "__module__", "") == VIEWER_MODULE:
                continue  # OHIF's files and pages: their own checks, in the viewer's tests
            requirements = list(_requirements(getattr(route, "dependant", None)))
            assert len(requirements) <= 1, f"{route.path}: several role requirements"
            for method in sorted(route.methods or ()):
                if method != "HEAD":
                    found.append(RouteInfo(method, route.path,
                                           requirements[0] if requirements else None))
        return found
    finally:
        v.close()


@dataclass
class World:
    server: Server
    vault: VaultDir
    routes: list[RouteInfo]
    tokens: dict[str, str]  # user -> bearer token
    browsers: dict[str, httpx.Client]  # user -> signed-in browser
    csrf: dict[str, str]

    def anonymous(self) -> httpx.Client:
        return client(self.server.https_port, self.vault.data / "tls" / "ca.crt")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    vault = make_vault(tmp_path_factory.mktemp("routes") / "v")
    v = vault.open()
    try:  # in-process: the CLI is tested in test_web_auth
        for user, password in PASSWORDS.items():
            v.accounts.add_user(user, [ROLES[user]], password, by="test")
        tokens = {user: v.accounts.create_token(user, "1d").token for user in ROLES}
    finally:
        v.close()
    routes = app_routes(vault)
    server = start_server(vault)
    passwords = {**PASSWORDS, "admin": vault.admin_password}
    browsers: dict[str, httpx.Client] = {}
    try:
        for user, password in passwords.items():
            browsers[user] = client(server.https_port, vault.data / "tls" / "ca.crt")
            sign_in(browsers[user], user, password)
        csrf = {user: page_csrf(b) for user, b in browsers.items()}
        yield World(server, vault, routes, tokens, browsers, csrf)
    finally:
        for b in browsers.values():
            b.close()
        server.stop()


def _call(browser: httpx.Client, route: RouteInfo, *, token: str = "",
          csrf: str = "") -> httpx.Response:
    # an API client: no text/html preference (which DICOMweb would answer with 406)
    headers = {"authorization": f"Bearer {token}", "accept": "*/*"} if token else {}
    if route.method == "GET":
        return browser.get(route.url, headers=headers)
    data = {"csrf": csrf} if csrf else {}
    return browser.request(route.method, route.url, headers=headers, data=data)


def test_every_route_declares_who_may_use_it(world: World) -> None:
    unguarded = {(r.method, r.path) for r in world.routes if r.requirement is None}
    assert unguarded == PUBLIC, "routes without a role requirement must be listed in PUBLIC"
    assert {(r.method, r.path) for r in world.routes} >= PUBLIC  # nothing listed for nothing
    # tokens are for DICOMweb only, and every DICOMweb route requires a role
    for r in world.routes:
        if r.requirement is not None:
            assert r.requirement.allow_token == r.dicomweb, r
        if r.dicomweb:
            assert r.requirement is not None and r.requirement.role is not None, r
    assert any(r.dicomweb for r in world.routes)  # the walk sees the included routers


def test_without_credentials_401_or_sign_in_page(world: World) -> None:
    with world.anonymous() as anonymous:
        for route in world.routes:
            anonymous.cookies.clear()  # no session either (GET /login makes one)
            res = _call(anonymous, route)
            key = (route.method, route.path)
            if key in ANONYMOUS_OK:
                assert res.status_code == ANONYMOUS_OK[key], (key, res.status_code)
                continue
            redirected = res.status_code == 303 and res.headers["location"].startswith(
                "/login")
            assert res.status_code == 401 or redirected, (key, res.status_code)
            if route.dicomweb or route.path in ("/health", "/admin/openapi.json"):
                assert res.status_code == 401, key  # APIs answer 401, not a redirect


def _holder(role: str | None) -> str:
    return next(u for u, r in ROLES.items() if role is None or r == role)


def _lacker(role: str) -> str:
    return next(u for u, r in ROLES.items() if r != role)


def test_tokens_reach_dicomweb_only(world: World) -> None:
    with world.anonymous() as api:
        for route in world.routes:
            if route.requirement is None:
                continue
            role = route.requirement.role
            token = world.tokens[_holder(role)]
            res = _call(api, route, token=token)
            if route.dicomweb:
                assert res.status_code not in (401, 403), (route, res.status_code, res.text)
            else:
                # even an admin's token on an admin route
                assert res.status_code == 401, (route, res.status_code)
                admin = _call(api, route, token=world.tokens["admin"])
                assert admin.status_code == 401, (route, admin.status_code)


def test_wrong_role_is_refused_with_403(world: World) -> None:
    checked = 0
    with world.anonymous() as api:
        for route in world.routes:
            if route.requirement is None or route.requirement.role is None:
                continue
            other = _lacker(route.requirement.role)
            # a signed-in session of a user without the role (with a valid CSRF token, so
            # the 403 is the role check, not the CSRF rule)
            res = _call(world.browsers[other], route, csrf=world.csrf[other])
            assert res.status_code == 403, (route, other, res.status_code)
            if route.dicomweb:
                res = _call(api, route, token=world.tokens[other])
                assert res.status_code == 403, (route, other, res.status_code)
            checked += 1
    assert checked >= 8


def test_signed_in_sessions_reach_their_pages(world: World) -> None:
    """The other side of the coin: the right user gets through (read-only routes)."""
    admin, phys = world.browsers["admin"], world.browsers["phys"]
    for path in ("/account", "/admin/users", "/admin/nodes", "/admin/health", "/health",
                 "/admin/openapi.json", "/admin/erasure"):
        assert admin.get(path).status_code == 200, path
    assert phys.get("/account").status_code == 200
    doc = admin.get("/admin/openapi.json").json()
    assert "/admin/users" in doc["paths"] and "/account" in doc["paths"]
    assert not any(p.startswith(DICOMWEB) for p in doc["paths"])
    # a physician's browser session works on DICOMweb too (the viewer will use it)
    search = next(r for r in world.routes if r.dicomweb and r.method == "GET")
    assert phys.get(search.url).status_code not in (401, 403)


def test_no_route_is_left_out(world: World, tmp_path: Path) -> None:
    """The inventory is what the server serves: an unknown path is a plain 404 (or, under
    the viewer's catch-all, the sign-in page for a browser without a session)."""
    with world.anonymous() as anonymous:
        for path in ("/no/such/route", "/openapi.json", "/docs"):
            res = anonymous.get(path)
            assert res.status_code in (401, 404) or (
                res.status_code == 303 and res.headers["location"].startswith("/login")), path
    admin = world.browsers["admin"]
    for path in ("/openapi.json", "/docs"):  # FastAPI's own documents are not served
        res = admin.get(path)
        assert res.status_code != 200 or "swagger" not in res.text.lower(), path
        assert '"openapi"' not in res.text, path
