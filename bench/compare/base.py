"""What a workload needs from a server under test (pacsvault or Orthanc)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from bench.compare.procs import Service, dir_size

SCU_AE = "BENCHSCU"


class Target(ABC):
    """One server instance in its own directory: DICOM (plain or TLS) and DICOMweb over HTTPS."""

    name: str
    called_ae: str

    def __init__(self, root: Path, tls: bool) -> None:
        self.root, self.tls = root, tls
        root.mkdir(parents=True, exist_ok=True)
        self.service: Service | None = None
        self.dicom_port = 0
        self.https_port = 0

    @abstractmethod
    def start(self) -> None: ...

    def allow_move(self, port: int) -> None:
        """Before ``start``: ``SCU_AE`` at 127.0.0.1:``port`` becomes a C-MOVE destination
        (``workloads.cmove``); only the loaded servers need it."""
        raise NotImplementedError(f"{self.name} cannot send by C-MOVE")

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()

    @property
    def pid(self) -> int:
        assert self.service is not None
        return self.service.pid

    @property
    @abstractmethod
    def scu_tls(self) -> list[str]:
        """dcmtk client options for this server's TLS port (mutual TLS), [] when plain."""

    @property
    @abstractmethod
    def storage_dir(self) -> Path:
        """Everything the server keeps on disk (objects, index, journal)."""

    @property
    def dicomweb_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}/dicom-web"

    @property
    @abstractmethod
    def ca_file(self) -> Path:
        """CA that signed the HTTPS certificate."""

    @property
    @abstractmethod
    def http_headers(self) -> dict[str, str]:
        """Authorization for DICOMweb."""

    def footprint(self) -> tuple[int, int]:
        return dir_size(self.storage_dir)
