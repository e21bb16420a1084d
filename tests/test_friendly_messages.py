"""Issue 12, defect 8: messages that say what happened.

Against the real HTTPS listener and application, in-process (``local_web``):

* a wrong TOTP code after the password step passed says it is the code, and to check the
  phone's clock (not "wrong user name, password or code"), in English and French;
* plain ``http://`` on the HTTPS port gets a short plain-HTTP 400 naming the https://
  address, instead of an empty response; HTTPS on the same port still works.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.helpers import VaultDir, make_vault
from tests.web_helpers import FakeClock, LocalWeb, csrf_of, local_web


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> VaultDir:
    return make_vault(tmp_path_factory.mktemp("messages") / "v")


@pytest.fixture
def web(vault: VaultDir) -> Iterator[LocalWeb]:
    with local_web(vault, FakeClock()) as running:
        yield running


def test_wrong_totp_code_says_it_is_the_code(web: LocalWeb, vault: VaultDir) -> None:
    with web.browser() as first:
        signed = web.sign_in(first, vault.admin_name, vault.admin_password)
    right = signed.authenticator.code()
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    for language, words, not_words in (
        ("en", ("Wrong code", "date and time"), "Wrong user name"),
        ("fr", ("Code incorrect", "date et l’heure"), "Nom d’utilisateur"),
    ):
        with web.browser() as browser:
            headers = {"accept-language": language}
            form = browser.get("/login", headers=headers)
            answer = browser.post("/login", headers=headers, data={
                "csrf": csrf_of(form.text), "name": vault.admin_name,
                "password": vault.admin_password})
            assert answer.headers["location"] == "/login/second-factor"
            page = browser.get("/login/second-factor", headers=headers)
            res = browser.post("/login/second-factor", headers=headers,
                               data={"csrf": csrf_of(page.text), "code": wrong})
            assert res.status_code == 401, res.status_code
            text = res.text.replace("&#39;", "'")
            assert all(w in text for w in words), text[-2000:]
            assert not_words not in text


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def test_plain_http_on_the_https_port_is_told_to_use_https(web: LocalWeb) -> None:
    answer = _raw(web.port, f"GET /login HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n"
                            "\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert f"https://127.0.0.1:{web.port}/".encode() in answer, answer
    # a Host that is not a plain host[:port] is not echoed
    answer = _raw(web.port, b"GET / HTTP/1.1\r\nHost: evil<script>\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"<script>" not in answer
    # HTTPS still works on the same port
    with web.browser() as browser:
        assert browser.get("/login").status_code == 200


def test_wrong_code_at_enrolment_says_it_is_the_code(web: LocalWeb) -> None:
    password = "un-stethoscope-oublie-sur-le-bureau"
    web.accounts.add_user("drnew", ["physician"], password, by="test")
    with web.browser() as browser:
        form = browser.get("/login")
        answer = browser.post("/login", data={"csrf": csrf_of(form.text), "name": "drnew",
                                              "password": password})
        assert answer.headers["location"] == "/login/enrol"
        page = browser.get("/login/enrol")
        res = browser.post("/login/enrol", data={"csrf": csrf_of(page.text),
                                                 "code": "000000"})
        assert res.status_code == 401, res.status_code
        text = res.text.replace("&#39;", "'")
        assert "Wrong code" in text and "date and time" in text, text[-2000:]
        assert "recovery code" not in text.split("Wrong code")[1][:200]
        assert "Wrong user name" not in text
