"""Orthanc under test: Debian's 1.10 with the DICOMweb plugin, configured as securely as
pacsvault is, so the comparison is like for like.

Generated config: HTTP authentication on (one registered user), remote HTTP access off,
SQLite index and storage in the instance's own temp dir, no storage compression, and deny
by default on DICOM: only the registered ``BENCHSCU`` modality from 127.0.0.1 may store,
find or get. Durability is Orthanc's own and not configurable in 1.10.1 (no
``SyncStorageArea`` option in the binary): strace shows one ``fdatasync`` per stored file,
no directory sync and no sync of its SQLite index (``PRAGMA SYNCHRONOUS=NORMAL``); the bench
counts fsync-like calls per image for both servers.
TLS rows turn DICOM TLS on with a certificate from a throwaway CA and *require* the client's
certificate (pacsvault's TLS rows are mutual TLS too). Orthanc 1.10 has no DICOM bind
address, so it listens on all interfaces; the bench only ever connects to 127.0.0.1.

One handicap is Orthanc's advantage: Debian's Orthanc 1.10.1 segfaults on the first HTTPS
request (``SslEnabled``, with an RSA or an ECDSA certificate: its civetweb with OpenSSL 3),
so its DICOMweb runs over plain HTTP on loopback, while pacsvault's is always HTTPS.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from bench.compare.base import SCU_AE, Target
from bench.compare.procs import DCMTK_ENV, Service, free_port, wait_port
from bench.ingest import make_peer_pki, tls_args

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER = "bench"


def ensure_installed() -> None:
    """apt-get install orthanc and its DICOMweb plugin when missing (Debian, as root)."""
    have = all(subprocess.run(["dpkg", "-s", p], capture_output=True, check=False).returncode == 0
               for p in ("orthanc", "orthanc-dicomweb"))
    if have and shutil.which("Orthanc") and PLUGIN.exists():
        return
    print("installing Debian packages orthanc orthanc-dicomweb", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "orthanc", "orthanc-dicomweb"],
                   check=True, env=env)
    if not PLUGIN.exists():
        raise RuntimeError(f"{PLUGIN} missing after install (see dpkg -L orthanc-dicomweb)")


@functools.cache
def version() -> str:
    out = subprocess.run(["Orthanc", "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0].strip() if out.stdout else "Orthanc ?"


class OrthancTarget(Target):
    name = "orthanc"
    called_ae = "ORTHANC"
    move_port = 0  # ``allow_move``: SCU_AE's port as a C-MOVE destination (0: none)

    def __init__(self, root: Path, tls: bool, pki: Path) -> None:
        super().__init__(root, tls)
        self.pki = pki
        self.password = secrets.token_urlsafe(24)
        self.db = root / "db"
        self.db.mkdir()
        if not (pki / "ca.crt").exists():
            make_peer_pki(pki)

    def config(self) -> dict[str, object]:
        cfg: dict[str, object] = {
            "Name": "bench",
            "StorageDirectory": str(self.db),
            "IndexDirectory": str(self.db),
            "StorageCompression": False,
            "MaximumStorageSize": 0,
            "MaximumPatientCount": 0,
            "Plugins": [str(PLUGIN)],
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "HttpServerEnabled": True,
            "HttpPort": self.https_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: self.password},
            "SslEnabled": False,  # segfaults in Debian's 1.10.1, see the module docstring
            "HttpsVerifyPeers": True,
            "DicomServerEnabled": True,
            "DicomAet": self.called_ae,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomCheckModalityHost": True,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "DicomModalities": {
                "benchscu": {"AET": SCU_AE, "Host": "127.0.0.1",
                             "Port": self.move_port or 1,
                             "AllowEcho": True, "AllowFind": True, "AllowGet": True,
                             "AllowMove": bool(self.move_port), "AllowStore": True},
            },
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
            "DeidentifyLogs": True,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        }
        if self.tls:
            cfg.update({
                "DicomTlsEnabled": True,
                "DicomTlsCertificate": str(self.pki / "server.crt"),
                "DicomTlsPrivateKey": str(self.pki / "server.key"),
                "DicomTlsTrustedCertificates": str(self.pki / "ca.crt"),
                "DicomTlsRemoteCertificateRequired": True,
            })
        return cfg

    def allow_move(self, port: int) -> None:
        self.move_port = port

    def start(self) -> None:
        self.dicom_port, self.https_port = free_port(), free_port()
        conf = self.root / "orthanc.json"
        conf.write_text(json.dumps(self.config(), indent=1))
        conf.chmod(0o600)
        self.service = Service(["Orthanc", str(conf)], self.root / "orthanc.log", env=DCMTK_ENV)
        wait_port(self.https_port, self.service.proc, self.service.log)
        wait_port(self.dicom_port, self.service.proc, self.service.log)

    @property
    def scu_tls(self) -> list[str]:
        if not self.tls:
            return []
        return tls_args(self.pki / "client.key", self.pki / "client.crt", self.pki / "ca.crt")

    @property
    def storage_dir(self) -> Path:
        return self.db

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.https_port}/dicom-web"

    @property
    def ca_file(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def http_headers(self) -> dict[str, str]:
        cred = base64.b64encode(f"{USER}:{self.password}".encode()).decode()
        return {"Authorization": f"Basic {cred}"}
