"""dcmtk binaries, their environment, free loopback ports and a dcmtk ``storescp`` peer."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from pydicom import dcmread

# Debian's dcmtk, what scripts/install.sh --test and CI install: looked for there first.
DCMTK = Path("/usr/bin")


@functools.cache
def dcmtk(tool: str) -> str:
    """Absolute path of dcmtk's ``tool``.

    Called by absolute path because pynetdicom installs Python scripts with the same names
    (storescu, echoscu …) that may come first on PATH: a candidate counts only if its
    ``--version`` says dcmtk. Raises RuntimeError (the benchmarks turn it into their exit
    message) when no dcmtk ``tool`` is installed.
    """
    dirs = [str(DCMTK), *os.environ.get("PATH", "").split(os.pathsep), "/usr/local/bin"]
    for d in dict.fromkeys(d for d in dirs if d):
        cand = Path(d) / tool
        if cand.is_file() and os.access(cand, os.X_OK):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run([cand, "--version"], capture_output=True, text=True,
                                     timeout=20, check=False)
                if "dcmtk" in (out.stdout + out.stderr).lower():
                    return str(cand)
    raise RuntimeError(f"dcmtk '{tool}' not found (pynetdicom's script of the same name does "
                       "not count): install Debian's dcmtk (apt-get install -y dcmtk; the "
                       "test command does)")


def dcmtk_env() -> dict[str, str]:
    """The environment for dcmtk tools (and Orthanc, built on dcmtk): Debian's dcmtk leaves
    Nagle's algorithm on unless ``TCP_NODELAY=1``, ~80 ms per C-STORE."""
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    """A loopback TCP port free right now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening_by(pid: int, port: int) -> bool:
    """Does process ``pid`` itself listen on TCP ``port`` (not merely someone)?"""
    try:
        connections = psutil.Process(pid).net_connections(kind="inet")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
               for c in connections)


def listening(port: int) -> bool:
    """Is something listening on ``port``? Read from /proc: no packet is sent to find out,
    so a peer that must never be reached shows no association in its log."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


@dataclass
class StoreSCP:
    """dcmtk ``storescp`` writing what it receives to ``out`` (a C-MOVE destination)."""

    ae_title: str
    port: int
    out: Path
    log_path: Path
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(cls, ae_title: str, root: Path, *flags: str, timeout: float = 15) -> StoreSCP:
        """``storescp *flags -aet AE -od root/scp-AE PORT``, once it listens (log beside).

        The port is the OS's free one of a moment ago: with the suite's parallel workers
        another process may take it first. So "listening" must mean *this* storescp holds
        the socket (a storescp that lost the race exits; another port is tried), never just
        "something listens there" (which once sent a C-MOVE into another test's storescp)."""
        out = root / f"scp-{ae_title}"
        out.mkdir(parents=True)
        log_path = root / f"scp-{ae_title}.log"
        for _attempt in range(5):
            port = free_port()
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [dcmtk("storescp"), *flags, "-aet", ae_title, "-od", str(out), str(port)],
                    stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env(),
                )
            deadline = time.monotonic() + timeout
            while not listening_by(proc.pid, port):
                if proc.poll() is not None:
                    break  # lost the port: try another
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait(10)
                    raise AssertionError(f"storescp did not start:\n{log_path.read_text()}")
                time.sleep(0.02)
            else:
                return cls(ae_title, port, out, log_path, proc)
        raise AssertionError(f"storescp found no free port:\n{log_path.read_text()}")

    def files(self) -> dict[str, Path]:
        """Received objects by SOP Instance UID (read from the objects themselves)."""
        return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                for p in self.out.iterdir() if p.is_file()}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def c_find_json(port: int, identifier: Any, *, calling: str, called: str) -> list[dict[str, Any]]:
    """A Study Root C-FIND through pynetdicom: the pending answers as DICOM JSON, sorted
    (answers have no order), for comparing two servers' answers."""
    from pynetdicom import AE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind as Find,
    )

    ae = AE(ae_title=calling)
    ae.add_requested_context(Find)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        answers = [ds.to_json_dict() for status, ds in assoc.send_c_find(identifier, Find)
                   if status and status.Status in (0xFF00, 0xFF01) and ds is not None]
    finally:
        assoc.release()
    return sorted(answers, key=str)
