"""One committer for every worker of ``serve --workers N`` on the embedded index (issue 17).

Why: with two processes each committing its own stores, each commit waited for the other
process's (the trail's file lock and SQLite's one writer), and each commit of one emptied
the other's SQLite page cache, so the second process cost more than the second core gave
(measured: one process 17.7 ``pread64`` and 1.5 ``fsync`` per one-instance study, a worker
of two 37.6 and 2.1, plus a ``flock``). Here worker 0 commits for all: the other workers
still receive, parse, encrypt and write each object (the work that needs a core), then
hand its index rows to worker 0 over a Unix socket (``DATA/commit.sock``, 0600 in the
0700 data directory, the peer's uid checked as the control socket does). Worker 0 puts
them in its own group commit (``storage.group_commit``), so the stores of every process
share one transaction, one trail record and one WAL commit.

What crosses the socket: the instance's index attributes (patient attributes included)
and, for a patient first seen, the data key minted for them (unwrapped; worker 0 wraps it
under the KEK inside the commit, as for its own stores). Memory to memory between two
processes of the same user: nothing is written anywhere. A frame is a 4-byte big-endian
length and a JSON object.

Nothing lost, whatever fails:

- the worker sends the rows as soon as its object is written, then a second frame once
  the object's fsync returned (``synced``): worker 0 writes the rows and the store record
  meanwhile, as it does beside its own objects' fsyncs, and commits no row before that
  frame said its object is durable (a worker gone before it: never committed; a frame
  that does not come within ``_SYNC_TIMEOUT_S``: that store alone fails, the others of
  the batch commit, the connection is closed);
- no committer to reach (worker 0 starting again, a stale socket): the worker commits
  itself, as before this module (correct, only slower);
- the committer gone after the request was sent (killed mid-commit): the row may or may
  not be committed. The store fails (the modality is told to retry; a re-send is then
  answered as a duplicate if it was committed) and its staged object is *kept*
  (``CommitOutcomeUnknown``): reads find it staged, and the next start's ``recover``
  publishes it if a row names it, deletes it otherwise.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import json
import os
import select
import socket
import struct
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError, OperationalError

from pacsvault.audit.events import AuditUnavailable
from pacsvault.dicomfile.parse import ParsedInstance
from pacsvault.service.control import listen_private, short_path
from pacsvault.storage.objects import DiskFullError
from pacsvault.storage.rows import Pending, StaleChoice, StoreResult, StoreStatus

SOCKET_NAME = "commit.sock"
_LENGTH = struct.Struct(">I")
_MAX_FRAME = 64 * 1024 * 1024  # a header's DICOM JSON, with room
# A commit waits for the trail and for SQLite's writer: a key rotation or an erasure may
# hold them a while. Past this, the outcome is unknown (the object kept, see the module).
_REPLY_TIMEOUT_S = 120.0
_PARSED = tuple(f.name for f in fields(ParsedInstance))
# A sending worker whose object's fsync does not return (a dying disk) must not hold
# worker 0's commits, its own stores' included: past this its store fails (not committed)
# and its connection is closed.
_SYNC_TIMEOUT_S = 60.0


class CommitOutcomeUnknown(OSError):
    """The committer was reached but gave no answer: the rows may be committed. The store
    fails (a retry is answered as a duplicate if they were) and its object is kept."""


class CommitFailed(Exception):
    """The committer failed the commit for a reason this process has no type for."""


# --- frames -----------------------------------------------------------------------------


def _send(sock: socket.socket, value: dict[str, Any]) -> None:
    body = json.dumps(value, separators=(",", ":")).encode("utf-8")
    sock.sendall(_LENGTH.pack(len(body)) + body)


def _exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionResetError("the commit link was closed")
        got += k
    return bytes(buf)


def _receive(sock: socket.socket) -> dict[str, Any]:
    (length,) = _LENGTH.unpack(_exactly(sock, _LENGTH.size))
    if length > _MAX_FRAME:
        raise ValueError("commit link frame too large")
    value = json.loads(_exactly(sock, length))
    if not isinstance(value, dict):
        raise ValueError("malformed commit link frame")
    return value


def _request(pending: Pending, syncing: bool) -> dict[str, Any]:
    parsed = asdict(pending.parsed)
    parsed["sha256"] = pending.parsed.sha256.hex()
    return {"parsed": parsed, "syncing": syncing, "object_id": pending.object_id,
            "key_id": str(pending.key_id), "source_ae": pending.source_ae,
            "generation": pending.generation,
            "actor_address": pending.actor_address, "actor_user": pending.actor_user,
            "new_key": None if pending.new_key is None else pending.new_key.hex()}


def _pending(request: dict[str, Any]) -> Pending:
    values = dict(request["parsed"])
    values["sha256"] = bytes.fromhex(values["sha256"])
    parsed = ParsedInstance(**{name: values[name] for name in _PARSED})
    new_key = request.get("new_key")
    return Pending(parsed, str(request["object_id"]), uuid.UUID(request["key_id"]),
                   str(request["source_ae"]), int(request["generation"]),
                   actor_address=str(request["actor_address"]),
                   actor_user=str(request["actor_user"]),
                   new_key=None if new_key is None else bytes.fromhex(new_key))


# What a failure is called on the wire, and made again on the other side: the statuses a
# modality is answered with (``dicom/status``) must not depend on which process committed.
_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (AuditUnavailable, "audit"), (StaleChoice, "stale"), (IntegrityError, "integrity"),
    (DiskFullError, "disk-full"), (OperationalError, "index"), (OSError, "os"),
)


def _synced(conn: socket.socket) -> None:
    """Worker 0, in its pool: the sending worker's word that the object is durable (its
    fsync returned), read from the connection; raises otherwise (never committed)."""
    readable, _, _ = select.select([conn], [], [], _SYNC_TIMEOUT_S)
    if not readable:
        raise TimeoutError("the sending worker did not say its object was durable")
    frame = _receive(conn)
    if frame.get("synced") is not True:
        code = frame.get("errno")
        raise OSError(code if isinstance(code, int) else errnos.EIO,
                      "the object could not be made durable by the sending worker")


def _failure(exc: BaseException) -> dict[str, Any]:
    kind = next((name for cls, name in _KINDS if isinstance(exc, cls)), "other")
    return {"ok": False, "error": kind, "type": type(exc).__name__,
            "errno": exc.errno if isinstance(exc, OSError) else None}


def _raise(reply: dict[str, Any]) -> None:
    kind, name = reply.get("error"), str(reply.get("type", "error"))
    if kind == "audit":
        raise AuditUnavailable("the audit trail cannot be written (committing worker)")
    if kind == "stale":
        raise StaleChoice("objects were removed meanwhile")
    if kind == "integrity":
        raise IntegrityError("commit link", None, Exception(name))
    if kind == "disk-full":
        raise DiskFullError("disk full while committing")
    if kind == "index":
        raise OperationalError("commit link", None, Exception(name))
    if kind == "os":
        code = reply.get("errno")
        raise OSError(code if isinstance(code, int) else errnos.EIO, f"{name} in the commit")
    raise CommitFailed(name)


# --- worker 0 ---------------------------------------------------------------------------


class CommitServer:
    """Worker 0's end: each connection's requests go to ``commit`` (the archive's group
    commit), one at a time per connection (a sending worker opens one per store running
    at once)."""

    def __init__(self, root: Path, commit: Callable[[Pending], None],
                 generation: Callable[[], int]) -> None:
        self._path = root / SOCKET_NAME
        self._commit = commit
        self._generation = generation
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = False
        # Reads each request's ``synced`` frame while its commit is under way
        self._syncs = ThreadPoolExecutor(max_workers=16, thread_name_prefix="commit-sync")

    def start(self) -> None:
        self._sock = listen_private(self._path, 64)
        threading.Thread(target=self._accept, name="commit-link", daemon=True).start()

    def stop(self) -> None:
        """No new request is taken; a commit in progress still answers (the worker
        waiting for it is told, or fails with the outcome unknown)."""
        with self._lock:
            self._stopped = True
            conns = list(self._conns)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)
        self._syncs.shutdown(wait=False)
        self._path.unlink(missing_ok=True)

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                if self._stopped:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="commit-link-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            if struct.unpack("3i", creds)[1] not in (0, os.geteuid()):
                return
            while True:
                try:
                    request = _receive(conn)
                except (OSError, ValueError):
                    return  # the worker went away (or a frame it should not send)
                reply, usable = self._handle(request, conn)
                _send(conn, reply)
                if not usable:  # its "synced" frame never came: out of step, closed
                    return
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _handle(self, request: dict[str, Any],
                conn: socket.socket) -> tuple[dict[str, Any], bool]:
        """The answer to one request, and whether the connection may serve the next (its
        ``synced`` frame was read: the next frame is a request)."""
        try:
            synced = self._syncs.submit(_synced, conn) if request.get("syncing") else None
        except RuntimeError:  # stopping: nothing taken (the sender fails its store)
            return _failure(RuntimeError()), False
        reply = self._answer(request, synced)
        return reply, synced is None or synced.exception() is None

    def _answer(self, request: dict[str, Any], synced: Future[None] | None) -> dict[str, Any]:
        try:
            pending = _pending(request)
        except (KeyError, TypeError, ValueError):
            return {"ok": False, "error": "other", "type": "MalformedRequest", "errno": None}
        pending.durable = synced  # committed only once the object is durable
        try:
            self._commit(pending)
        except Exception as exc:  # answered as its kind; logged by the sender's caller
            reply = _failure(exc)
            reply["generation"] = self._generation()
            return reply
        result = pending.result
        return {"ok": True, "generation": self._generation(),
                "result": None if result is None else [result.status.value, result.sop_uid,
                                                       result.study_uid],
                "learnt": _learnt_out(pending.learnt)}


def _learnt_out(learnt: dict[str, Any]) -> dict[str, Any]:
    study, series, patient = learnt.get("study"), learnt.get("series"), learnt.get("patient")
    return {"study": None if study is None else [study[0], str(study[1])],
            "series": series, "patient": None if patient is None else str(patient)}


def _learnt_in(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {}
    study, patient = value.get("study"), value.get("patient")
    return {"study": None if study is None else (int(study[0]), uuid.UUID(study[1])),
            "series": value.get("series"),
            "patient": None if patient is None else uuid.UUID(patient)}


# --- the other workers ------------------------------------------------------------------


class CommitClient:
    """A worker's end: ``commit`` hands a store's rows to worker 0 and returns what it
    answered, or False when no committer can be reached (the caller commits itself)."""

    def __init__(self, root: Path) -> None:
        self._path = root / SOCKET_NAME
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def _connection(self) -> socket.socket | None:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with short_path(self._path) as where:
                sock.connect(where)
        except OSError:
            sock.close()
            return None
        sock.settimeout(_REPLY_TIMEOUT_S)
        return sock

    def commit(self, pending: Pending,
               learn: Callable[[Pending, int], None]) -> bool:
        """Commit ``pending``'s rows through worker 0: True once they are (``pending``'s
        result and learnt set, ``learn`` told the batch's generation), an exception as
        ``GroupCommit._commit`` raises it, or False with nothing sent (no committer)."""
        durable = pending.durable  # the object's fsync, if it still runs
        request = _request(pending, syncing=durable is not None)
        for _attempt in range(2):
            sock = self._connection()
            if sock is None:
                return False
            try:
                _send(sock, request)
                break
            except OSError:  # a stale connection (worker 0 restarted): nothing was taken
                sock.close()
        else:
            return False
        failed: BaseException | None = None
        if durable is not None:  # worker 0 writes the rows meanwhile, commits after this
            failed = durable.exception()
            try:
                _send(sock, {"synced": failed is None,
                             "errno": failed.errno if isinstance(failed, OSError) else None})
            except OSError:
                sock.close()  # worker 0 never read "synced": nothing was committed
                if failed is not None:
                    raise failed from None
                raise ConnectionResetError("the committing worker went away") from None
        try:
            reply = _receive(sock)
        except (OSError, ValueError):
            sock.close()
            raise CommitOutcomeUnknown(errnos.EIO, "the committing worker did not answer; "
                                       "the image may or may not be stored") from None
        with self._lock:
            self._idle.append(sock)
        if failed is not None:  # never committed: the object's own failure
            raise failed
        ok = bool(reply.get("ok"))
        pending.learnt = _learnt_in(reply.get("learnt")) if ok else {}
        generation = reply.get("generation")
        if isinstance(generation, int):  # a removal seen there: this process's caches too
            learn(pending, generation)
        if not ok:
            _raise(reply)
        result = reply.get("result")
        if result is not None:
            pending.result = StoreResult(StoreStatus(result[0]), str(result[1]),
                                         str(result[2]))
        return True
