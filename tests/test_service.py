"""Issue 12: pacsvault as a hardened system service under its own user.

CI has no running systemd, so the unit is checked with ``systemd-analyze verify`` and its
hardening with ``systemd-analyze security --offline=true``; the installed layout is tested
for real: ``service install`` under a temporary root with a throw-away system user, then
``serve`` run as that user (found through the system config, no ``--data``), an image
stored with dcmtk's storescu and read back with ``export``. ``MemoryDenyWriteExecute`` is
checked with the kernel's own equivalent (``PR_SET_MDWE``), and ``serve`` as root refuses.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.corpus import synthetic_ct_series
from tests.helpers import VaultDir, pv, storescu
from tests.web_helpers import client, sign_in, write_secret

SYSTEM_PYTHON = Path("/usr/bin/python3")
REPO = Path(__file__).resolve().parent.parent


def _render(tmp_path: Path) -> Path:
    from pacsvault.service.install import Layout, Options, render_unit

    unit = tmp_path / "pacsvault.service"
    unit.write_text(render_unit(Options(Layout(Path("/")))))
    return unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_verifies_and_is_hardened_below_2(tmp_path: Path) -> None:
    unit = _render(tmp_path)
    text = unit.read_text()
    for line in ("User=pacsvault", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ProtectHome=yes", "PrivateTmp=yes", "PrivateDevices=yes",
                 "CapabilityBoundingSet=\n", "AmbientCapabilities=\n",
                 "ReadWritePaths=/var/lib/pacsvault\n",
                 "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
                 "SystemCallFilter=@system-service", "SystemCallArchitectures=native",
                 "MemoryMax=", "UMask=0077", "Restart=on-failure",
                 "WantedBy=multi-user.target",
                 "--data /var/lib/pacsvault --key-file /etc/pacsvault/keys/master.key"):
        assert line in text, line
    assert "@" not in re.sub(r"@system-service|@privileged", "", text.split("[Unit]")[1])
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    assert "pacsvault.service" not in verify.stderr, verify.stderr  # no warning about it
    score = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                           capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for pacsvault\.service: (\d+\.\d+)",
                      score.stdout)
    assert found, score.stdout + score.stderr
    assert float(found.group(1)) < 2.0, score.stdout


def test_serve_as_root_is_refused(vault: VaultDir) -> None:
    assert os.geteuid() == 0, "the suite runs as root (CI)"
    env = {k: v for k, v in os.environ.items() if k != "PACSVAULT_ALLOW_ROOT"}
    proc = pv("serve", "--data", vault.data, "--key-file", vault.key, "--https-port", "0",
              "--dicom-port", "0", "--dicom-tls-port", "0", env=env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "refuses to run as root" in proc.stderr
    assert "pacsvault service install" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (vault.data / "serve.json").exists()


# --- the installed layout, for real -------------------------------------------------------


def _site_packages() -> str:
    import sqlalchemy

    return str(Path(sqlalchemy.__file__).parent.parent)


@pytest.fixture
def service_root() -> Iterator[tuple[Path, str]]:
    """A temporary root every user can traverse, and a throw-away system user."""
    if not SYSTEM_PYTHON.exists() or subprocess.run(
        [str(SYSTEM_PYTHON), "-c", f"import sys; assert sys.version_info[:2] == "
         f"{tuple(sys.version_info[:2])}"], check=False).returncode != 0:
        pytest.skip("needs /usr/bin/python3 of this venv's version (the venv's own "
                    "interpreter may live under /root, which the service user cannot read)")
    user = f"pvtest{secrets.token_hex(3)}"
    root = Path(tempfile.mkdtemp(prefix="pvsvc-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root, user
    finally:
        subprocess.run(["userdel", user], capture_output=True, check=False)
        subprocess.run(["groupdel", user], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


def _as(user: str, root: Path, *args: str) -> list[str]:
    """A command as the service user, the way the unit runs it (clean environment)."""
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--",
            "env", "-i", "PATH=/usr/bin:/bin", "LANG=C.UTF-8",
            f"PYTHONPATH={_site_packages()}:{REPO / 'src'}",
            f"PACSVAULT_CONFIG={root}/etc/pacsvault/pacsvault.toml",
            f"XDG_CACHE_HOME={root}/var/cache/{user}",
            str(SYSTEM_PYTHON), "-m", "pacsvault", *args]


@pytest.mark.slow
def test_install_layout_and_serve_as_the_service_user(
        service_root: tuple[Path, str], tmp_path: Path) -> None:
    root, user = service_root
    proc = pv("service", "install", "--root", root, "--user", user, "--no-start",
              "--python", SYSTEM_PYTHON, "--pythonpath", f"{_site_packages()}:{REPO / 'src'}",
              "--admin", "admin", timeout=300)
    out = proc.stdout
    data, etc = root / "var/lib/pacsvault", root / "etc/pacsvault"
    key = etc / "keys/master.key"
    info = pwd.getpwnam(user)
    assert info.pw_shell in ("/usr/sbin/nologin", "/bin/false")
    assert not Path(info.pw_dir).exists()
    assert f"Data:      {data}" in out and f"Key:       {key}" in out
    assert f"CA file:   {data}/tls/ca.crt" in out and "https://" in out
    assert "systemd is not running here" in out
    # Ownership and modes: data 0700 and key 0600, both the service user's; key outside.
    for path, mode in ((data, 0o700), (etc / "keys", 0o700), (key, 0o600)):
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (mode, info.pw_uid), path
    assert stat.S_IMODE(etc.stat().st_mode) == 0o755 and etc.stat().st_uid == 0
    assert (etc / "pacsvault.toml").read_text().count(str(data)) == 1
    unit = (root / "etc/systemd/system/pacsvault.service").read_text()
    assert f"User={user}" in unit and f"ReadWritePaths={data}\n" in unit
    secrets_file = Path(re.search(r"Secrets:\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    assert secrets_file.parent == etc / "keys"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    assert "password:" in secrets_file.read_text()
    # Everything in the data dir belongs to the service user (init ran as that user).
    assert {p.stat().st_uid for p in data.rglob("*")} == {info.pw_uid}
    # Running it again keeps everything.
    before = (data / "vault.json").read_bytes()
    pv("service", "install", "--root", root, "--user", user, "--no-start",
       "--python", SYSTEM_PYTHON, "--pythonpath", f"{_site_packages()}:{REPO / 'src'}")
    assert (data / "vault.json").read_bytes() == before

    # Root typing commands on the service's vault (README: '.venv/bin/pacsvault node add'
    # as root) leaves nothing the service cannot open: here the trail's lock file and a
    # renewed crl.pem would be root's.
    root_env = {**os.environ, "PACSVAULT_CONFIG": str(etc / "pacsvault.toml")}
    as_root = pv("node", "add", "CT2", "--host", "127.0.0.1", "--tls", "--client-cert",
                 env=root_env)
    assert f"data directory {data}" in as_root.stderr
    pv("node", "cert", "CT2", "--out", tmp_path / "ct2", env=root_env)
    pv("node", "cert", "CT2", "--revoke", env=root_env)
    assert {p.stat().st_uid for p in data.rglob("*")} == {info.pw_uid}
    # As the service user, without --data: the system config names the vault.
    added = subprocess.run(_as(user, root, "node", "add", "MODALITY", "--host", "127.0.0.1"),
                           capture_output=True, text=True, timeout=120, cwd="/")
    assert added.returncode == 0, added.stderr
    assert f"data directory {data}" in added.stderr
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        server = subprocess.Popen(
            _as(user, root, "serve", "--bind", "127.0.0.1", "--dicom-port", "0",
                "--dicom-tls-port", "0", "--https-port", "0"),
            stdout=fh, stderr=subprocess.STDOUT, cwd="/")
    try:
        state = _wait_state(data / "serve.json", server, log)
        image = synthetic_ct_series(tmp_path / "ct", 1, size=64)[0]
        sent = storescu(state["dicom_port"], [image], calling="MODALITY")
        assert sent.returncode == 0, sent.stderr
        out_dir = root / "export"
        out_dir.mkdir()
        os.chown(out_dir, info.pw_uid, info.pw_gid)
        exported = subprocess.run(_as(user, root, "export", "--all", "--out", str(out_dir)),
                                  capture_output=True, text=True, timeout=120, cwd="/")
        assert exported.returncode == 0, exported.stderr
        files = [p for p in out_dir.rglob("*") if p.is_file()]
        assert len(files) == 1, files
        assert dcmread(files[0]).SOPInstanceUID == dcmread(image).SOPInstanceUID
        assert dcmread(files[0]).PixelData == dcmread(image).PixelData
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0, log.read_text()
    text = log.read_text()
    assert f"data directory {data}" in text
    assert {p.stat().st_uid for p in data.rglob("*")} == {info.pw_uid}


def _wait_state(path: Path, proc: subprocess.Popen[bytes], log: Path,
                timeout: float = 60) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}:\n{log.read_text()}")
        try:
            state: dict[str, int] = json.loads(path.read_text())
            return state
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.1)
    raise AssertionError(f"serve did not start:\n{log.read_text()}")


# --- MemoryDenyWriteExecute ---------------------------------------------------------------

MDWE = ("import ctypes, os, sys; "
        "assert ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) == 0; "  # PR_SET_MDWE, REFUSE_EXEC_GAIN
        "os.execv(sys.executable, [sys.executable, '-m', 'pacsvault', *sys.argv[1:]])")


@pytest.mark.slow
def test_server_works_without_writable_executable_memory(vault: VaultDir,
                                                         tmp_path: Path) -> None:
    """The unit sets MemoryDenyWriteExecute=yes: the same rule, applied by the kernel
    (PR_SET_MDWE, inherited across exec), while the server stores, renders (numpy,
    Pillow, openjpeg) and signs a user in (Argon2 through cffi)."""
    probe = subprocess.run([sys.executable, "-c", "import ctypes; "
                            "raise SystemExit(ctypes.CDLL(None).prctl(65, 1, 0, 0, 0))"],
                           check=False)
    if probe.returncode != 0:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3)")
    vault.add_node("MODALITY")
    password = "correct horse battery staple 7 tulips"
    vault.cli("user", "add", "doctor", "--role", "physician", "--password-file",
              write_secret(tmp_path / "pw", password))
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        server = subprocess.Popen(
            [sys.executable, "-c", MDWE, "serve", "--data", str(vault.data), "--key-file",
             str(vault.key), "--bind", "127.0.0.1", "--dicom-port", "0",
             "--dicom-tls-port", "0", "--https-port", "0"],
            stdout=fh, stderr=subprocess.STDOUT)
    try:
        state = _wait_state(vault.data / "serve.json", server, log)
        j2k = Path(get_testdata_file("MR_small_jp2klossless.dcm"))  # type: ignore[arg-type]
        sent = storescu(state["dicom_port"], [j2k], calling="MODALITY", extra=("-xv",))
        assert sent.returncode == 0, sent.stderr
        ds = dcmread(j2k)
        with client(state["https_port"], vault.data / "tls" / "ca.crt") as browser:
            sign_in(browser, "doctor", password)
            url = (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/"
                   f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/rendered")
            rendered = browser.get(url, headers={"accept": "image/png"})
            assert rendered.status_code == 200, rendered.text
            assert rendered.content.startswith(b"\x89PNG")
        assert server.poll() is None
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0, log.read_text()
    assert "PermissionError" not in log.read_text()


# --- scripts/serve.sh as root (README's first command), with its tools stubbed ------------


def _fake_checkout(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A copy of serve.sh whose install step, CLI and runuser only record their calls."""
    repo, stubs, log = tmp_path / "repo", tmp_path / "stubs", tmp_path / "calls.log"
    (repo / "scripts").mkdir(parents=True)
    (repo / ".venv" / "bin").mkdir(parents=True)
    stubs.mkdir()
    shutil.copy(REPO / "scripts" / "serve.sh", repo / "scripts" / "serve.sh")
    for path, name in ((repo / "scripts" / "install.sh", "install.sh"),
                       (repo / ".venv" / "bin" / "pacsvault", "pacsvault"),
                       (stubs / "runuser", "runuser")):
        path.write_text(f'#!/bin/sh\necho "{name} $*" >> "$CALLS"\n')
        path.chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "CALLS": str(log), "LANG": "C.UTF-8"}
    return repo.resolve(), log, env


@pytest.mark.skipif(Path("/run/systemd/system").is_dir(), reason="systemd runs here")
def test_serve_sh_as_root_sets_up_the_service_then_runs_as_its_user(tmp_path: Path) -> None:
    repo, log, env = _fake_checkout(tmp_path)
    proc = subprocess.run(["bash", str(repo / "scripts" / "serve.sh"), "--dicom-port", "4242"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "install.sh "
    assert calls[1] == f"runuser -u nobody -- {repo}/.venv/bin/python -c import pacsvault"
    assert calls[2] == "pacsvault service install --user pacsvault"
    last = calls[3]
    assert last.startswith("runuser -u pacsvault -- env -i "), last
    assert "PACSVAULT_CONFIG=/etc/pacsvault/pacsvault.toml" in last
    assert last.endswith(f"{repo}/.venv/bin/python -m pacsvault serve --dicom-port 4242")
    assert "PACSVAULT_ALLOW_ROOT" not in last
    assert "systemd is not running" in proc.stderr


def test_serve_sh_never_makes_a_second_vault_beside_an_old_one(tmp_path: Path) -> None:
    if Path("/etc/pacsvault/pacsvault.toml").exists():
        pytest.skip("this machine has a service installation")
    repo, log, env = _fake_checkout(tmp_path)
    (repo / "pacsvault-data").mkdir()
    (repo / "pacsvault-data" / "vault.json").write_text("{}")
    proc = subprocess.run(["bash", str(repo / "scripts" / "serve.sh")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    assert "a vault from an earlier version" in proc.stderr
    assert not log.exists() or "service install" not in log.read_text()
