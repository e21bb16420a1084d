"""Physical limits measured in the same run, so each figure is also a fraction of one."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MiB = 1 << 20


def disk_write_fsync(directory: Path, total: int) -> float:
    """Sequential write of ``total`` bytes in 1 MiB blocks, fsync'ed at the end: MB/s."""
    path = directory / "limits-disk.bin"
    block = os.urandom(MiB)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(total // MiB):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    secs = time.perf_counter() - t0
    path.unlink()
    return total / secs / 1e6


def small_files_fsync(directory: Path, count: int, size: int) -> float:
    """Files/s for ``count`` files of ``size`` bytes, each fsync'ed then renamed (a durable
    store's per-object cost, as both servers pay it per image): files/s."""
    work = directory / "limits-files"
    work.mkdir(exist_ok=True)
    data = os.urandom(size)
    t0 = time.perf_counter()
    for i in range(count):
        tmp = work / f"{i}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, work / f"{i}.obj")
    dfd = os.open(work, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    secs = time.perf_counter() - t0
    for p in work.iterdir():
        p.unlink()
    work.rmdir()
    return count / secs


def aes_gcm(seconds: float) -> float:
    """AES-256-GCM encryption with ``cryptography`` on one core, 1 MiB chunks: MB/s."""
    aead = AESGCM(AESGCM.generate_key(256))
    data = os.urandom(MiB)
    nonce = os.urandom(12)
    n = 0
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        aead.encrypt(nonce, data, b"")
        n += 1
    return n * MiB / elapsed / 1e6


def loopback_tcp(total: int) -> float:
    """One TCP stream over 127.0.0.1 (sendall / recv_into release the GIL): MB/s."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    received = 0

    def sink() -> None:
        nonlocal received
        conn, _ = srv.accept()
        buf = bytearray(4 * MiB)
        with conn:
            while n := conn.recv_into(buf):
                received += n

    thread = threading.Thread(target=sink)
    thread.start()
    block = os.urandom(4 * MiB)
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as cli:
        for _ in range(total // len(block)):
            cli.sendall(block)
    thread.join()
    secs = time.perf_counter() - t0
    srv.close()
    return received / secs / 1e6


def measure(directory: Path, small: bool) -> dict[str, float]:
    return {
        "disk_write_fsync_MBps": disk_write_fsync(directory, (64 if small else 512) * MiB),
        "small_files_fsync_per_s": small_files_fsync(directory, 50 if small else 300, 512 * 1024),
        "aes_256_gcm_1core_MBps": aes_gcm(0.5 if small else 2.0),
        "loopback_tcp_MBps": loopback_tcp((512 if small else 4096) * MiB),
    }
