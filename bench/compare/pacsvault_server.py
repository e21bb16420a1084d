"""pacsvault under test: a fresh vault, started as ``tests/helpers.start_server`` does.

Secure defaults throughout: encryption always, the storescu node registered (roles store,
query, retrieve), ``--tls --client-cert`` for TLS rows (certificate from ``node cert``), and
DICOMweb over the vault's HTTPS with a bearer token created in-process (no secret on argv).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.compare.base import SCU_AE, Target
from bench.compare.procs import Service, wait_port
from bench.ingest import tls_args

USER = "benchviewer"


def pv(*args: str | Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "pacsvault", *map(str, args)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"pacsvault {args[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


class PacsvaultTarget(Target):
    name = "pacsvault"
    called_ae = "PACSVAULT"

    def __init__(self, root: Path, tls: bool, template: Path | None = None,
                 workers: int | str = 1) -> None:
        """A new vault in ``root``; a copy of ``template`` (made the same way) if given, so
        that every ingest cell starts from an identical, pristine vault without paying
        for ``init`` again. ``workers``: ``serve --workers`` (a number or ``auto``). 1 here
        for the focused A/B scripts (one process to attribute CPU to); ``bench compare``
        passes its ``--pv-workers``, the product's default ``auto`` unless told otherwise,
        because a practice runs the default."""
        self.workers = workers
        if template is not None and (template / "token").exists():
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(template, root, symlinks=True)
        super().__init__(root, tls)
        self.data, self.key = root / "data", root / "keys" / "master.key"
        self.token = ""
        if (root / "token").exists():
            self.token = (root / "token").read_text().strip()
            return
        common = ("--data", self.data, "--key-file", self.key)
        pv("init", *common, "--ae-title", self.called_ae)
        flags = ["--tls", "--client-cert"] if tls else []
        pv("node", "add", SCU_AE, "--host", "127.0.0.1", "--roles", "store,query,retrieve",
           *flags, *common)
        if tls:
            pv("node", "cert", SCU_AE, "--out", root / "client", *common)
        self._make_token()

    def _make_token(self) -> None:
        from pacsvault.vault import Vault

        quiet = io.StringIO()  # the in-process recorder echoes events (no patient data)
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            vault = Vault.open(self.data, self.key)
            try:
                vault.accounts.add_user(USER, ["physician"], secrets.token_urlsafe(24))
                self.token = vault.accounts.create_token(USER, "1d", label="bench").token
            finally:
                vault.close()
        path = self.root / "token"
        path.touch(0o600)
        path.write_text(self.token)

    def allow_move(self, port: int) -> None:
        pv("node", "set", SCU_AE, "--port", str(port), "--data", self.data,
           "--key-file", self.key)

    def start(self) -> None:
        state = self.data / "serve.json"
        state.unlink(missing_ok=True)
        tmp = self.root / "tmp"
        tmp.mkdir(exist_ok=True)
        self.service = Service(
            [sys.executable, "-m", "pacsvault", "serve", "--data", str(self.data),
             "--key-file", str(self.key), "--bind", "127.0.0.1", "--dicom-port", "0",
             "--dicom-tls-port", "0", "--https-port", "0", "--workers", str(self.workers)],
            self.root / "serve.log", env={**os.environ, "TMPDIR": str(tmp)})
        deadline = time.monotonic() + 60
        while True:
            try:
                ports = json.loads(state.read_text())
                break
            except (FileNotFoundError, json.JSONDecodeError) as exc:
                if self.service.proc.poll() is not None or time.monotonic() > deadline:
                    self.service.stop()
                    raise RuntimeError(f"serve did not start; log {self.service.log}") from exc
                time.sleep(0.05)
        self.dicom_port = int(ports["dicom_tls_port" if self.tls else "dicom_port"])
        self.https_port = int(ports["https_port"])
        wait_port(self.dicom_port, self.service.proc, self.service.log)

    @property
    def scu_tls(self) -> list[str]:
        if not self.tls:
            return []
        c = self.root / "client"
        return tls_args(c / f"{SCU_AE}.key", c / f"{SCU_AE}.crt", self.data / "tls" / "ca.crt")

    @property
    def storage_dir(self) -> Path:
        return self.data

    @property
    def ca_file(self) -> Path:
        return self.data / "tls" / "ca.crt"

    @property
    def http_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}
