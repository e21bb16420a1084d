"""A thin, careful wrapper around the ``restic`` binary (Debian's restic 0.14).

Why this shape:

- Passwords never touch argv, the environment or a file: each one is written into a pipe
  and restic reads it from ``/dev/fd/N`` (``--password-file``, ``--new-password-file``),
  the pipe's read end being the only descriptor handed to the child (``pass_fds``).
- The child gets a clean environment: PATH, a C locale, and the repository credentials
  (S3/SFTP/REST variables) read from the target's ``credentials_file`` (0600 checked,
  ``KEY=VALUE`` lines). Nothing of ours leaks to restic, nothing of restic's config leaks in.
- restic's cache holds copies of repository files, which restic encrypts like everything
  else it writes: ciphertext only (checked by the PHI scan test). It lives under the data
  dir (``DATA/.backup-cache``) or is disabled (restore on a new machine).
- Every call has a bounded duration; a failure becomes one clear line (``ResticError``),
  never a Go stack or a wall of progress output.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Bounds on each kind of call (seconds). A backup of a large archive to a slow off-site
# target can take hours the first time; listing snapshots cannot.
TIMEOUT_SHORT = 300.0
TIMEOUT_LONG = 24 * 3600.0

_RESERVED_ENV = ("RESTIC_PASSWORD", "RESTIC_PASSWORD_FILE", "RESTIC_PASSWORD_COMMAND",
                 "RESTIC_REPOSITORY", "RESTIC_REPOSITORY_FILE")


class ResticError(Exception):
    """A restic call failed; the message is one user-facing line (no patient data: restic
    only ever sees ciphertext file names and our random object ids)."""


class WrongPassword(ResticError):
    """The repository exists but does not open with this password / recovery code."""


class NoRepository(ResticError):
    """There is no restic repository at this location (yet)."""


def read_credentials(path: Path | None) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, blanks ignored) from a file only its owner can
    read: they are the keys to an off-site bucket or server."""
    if path is None:
        return {}
    try:
        st = path.stat()
    except OSError:
        raise ResticError(f"credentials file {path} cannot be read") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ResticError(f"credentials file {path} is readable by other users; "
                          f"run: chmod 600 {path}")
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not name.replace("_", "").isalnum():
            raise ResticError(f"credentials file {path}, line {number}: expected KEY=VALUE")
        if name in _RESERVED_ENV:
            raise ResticError(f"credentials file {path}: {name} is not allowed (the "
                              "repository password is derived from the vault's keys)")
        values[name] = value.strip()
    return values


@contextlib.contextmanager
def _secret_fds(secrets: Sequence[bytes]) -> Iterator[list[int]]:
    """One pipe per secret, already written and closed on the writing side: the child
    reads ``/dev/fd/<read end>`` like a file. A password is far below a pipe's buffer."""
    fds: list[int] = []
    try:
        for secret in secrets:
            read_end, write_end = os.pipe()
            fds.append(read_end)
            try:
                os.write(write_end, secret + b"\n")
            finally:
                os.close(write_end)
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def _one_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    # restic ends with "Fatal: ..." or an error line; progress and warnings come before.
    fatal = [ln for ln in lines if ln.startswith("Fatal:")]
    text = (fatal[-1] if fatal else lines[-1]) if lines else "no message"
    text = text.removeprefix("Fatal:").strip()
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass
class Repository:
    """One restic repository opened with one password."""

    location: str
    password: bytes
    env: dict[str, str] = field(default_factory=dict)
    binary: str = "restic"
    cache_dir: Path | None = None  # None: --no-cache

    def _base_env(self) -> dict[str, str]:
        # HOME and the ssh agent: an sftp: repository runs ssh, which reads ~/.ssh
        # (known_hosts, the key). Nothing else of ours is inherited.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        for name in ("HOME", "SSH_AUTH_SOCK", "TMPDIR"):
            if os.environ.get(name):
                env[name] = os.environ[name]
        env.update(self.env)
        return env

    def run(self, args: Sequence[str], *, timeout: float = TIMEOUT_SHORT,
            cwd: Path | None = None, stdin: bytes | None = None,
            new_password: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run one restic command; raise ResticError (one line) unless it exits 0."""
        secrets = [self.password] + ([new_password] if new_password is not None else [])
        with _secret_fds(secrets) as fds:
            argv = [self.binary, "--repo", self.location, "--password-file",
                    f"/dev/fd/{fds[0]}", "--quiet"]
            if new_password is not None:
                argv += ["--new-password-file", f"/dev/fd/{fds[1]}"]
            argv += ["--cache-dir", str(self.cache_dir)] if self.cache_dir else ["--no-cache"]
            argv += list(args)
            try:
                proc = subprocess.run(
                    argv, input=stdin if stdin is not None else b"", capture_output=True,
                    env=self._base_env(), cwd=cwd, timeout=timeout, pass_fds=fds,
                    check=False)
            except FileNotFoundError:
                raise ResticError(f"the restic program was not found ({self.binary}); "
                                  "install Debian's restic package") from None
            except subprocess.TimeoutExpired:
                raise ResticError(f"restic {args[0]} did not finish within "
                                  f"{int(timeout)} s") from None
        if proc.returncode != 0:
            message = _one_line(proc.stderr.decode("utf-8", "replace"))
            lowered = message.lower()
            if "wrong password" in lowered or "no key found" in lowered:
                raise WrongPassword("the backup repository does not open with this password "
                                    "or recovery code")
            if ("unable to open config file" in lowered or "does not exist" in lowered
                    or "is there a repository at" in lowered):
                raise NoRepository(f"no backup repository at {self.location} (run "
                                   "'pacsvault backup init')")
            raise ResticError(f"restic {args[0]} failed: {message}")
        return proc

    def json(self, args: Sequence[str], **kw: Any) -> Any:
        out = self.run([*args, "--json"], **kw).stdout.decode("utf-8", "replace")
        return json.loads(out) if out.strip() else None

    def json_lines(self, args: Sequence[str], **kw: Any) -> list[dict[str, Any]]:
        out = self.run([*args, "--json"], **kw).stdout.decode("utf-8", "replace")
        items: list[dict[str, Any]] = []
        for line in out.splitlines():
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    items.append(value)
        return items

    # --- operations ------------------------------------------------------------------

    def exists(self) -> bool:
        """The repository opens with our password (False: no repository there).
        Raises WrongPassword when one exists that our password does not open."""
        try:
            self.run(["cat", "config"])
        except NoRepository:
            return False
        return True

    def init(self) -> None:
        self.run(["init"], timeout=TIMEOUT_SHORT)

    def add_key(self, new_password: bytes) -> None:
        self.run(["key", "add"], new_password=new_password)

    def backup(self, paths: Sequence[str], *, cwd: Path, tags: Sequence[str], host: str,
               excludes: Sequence[str] = ()) -> dict[str, Any]:
        args = ["backup", "--host", host]
        for tag in tags:
            args += ["--tag", tag]
        for pattern in excludes:
            args += ["--exclude", pattern]
        items = self.json_lines([*args, *paths], cwd=cwd, timeout=TIMEOUT_LONG)
        return _summary(items)

    def backup_stdin(self, data: bytes, filename: str, *, tags: Sequence[str],
                     host: str) -> dict[str, Any]:
        args = ["backup", "--host", host, "--stdin", "--stdin-filename", filename]
        for tag in tags:
            args += ["--tag", tag]
        return _summary(self.json_lines(args, stdin=data))

    def backup_stream(self, chunks: Iterator[bytes], filename: str, *, tags: Sequence[str],
                      host: str) -> dict[str, Any]:
        """``backup --stdin`` fed from ``chunks`` (a pg_dump as it is produced: nothing on
        disk). Should ``chunks`` raise (the producer failed), restic is killed before it
        sees the end of its input, so no snapshot of a truncated stream is ever made."""
        args = ["backup", "--host", host, "--stdin", "--stdin-filename", filename, "--json"]
        for tag in tags:
            args += ["--tag", tag]
        with self._spawn(args, stdin=True) as (proc, drained):
            assert proc.stdin is not None
            try:
                for chunk in chunks:
                    proc.stdin.write(chunk)
            except BrokenPipeError:
                pass  # restic stopped reading: its exit status says why
            except BaseException:
                proc.kill()
                raise
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            out = self._finish(proc, drained, args, TIMEOUT_LONG)
        items: list[dict[str, Any]] = []
        for line in out.decode("utf-8", "replace").splitlines():
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    items.append(value)
        return _summary(items)

    @contextlib.contextmanager
    def dump_stream(self, snapshot: str, filename: str) -> Iterator[Iterator[bytes]]:
        """The file ``filename`` of ``snapshot`` as chunks, straight from ``restic dump``
        (a pg_dump streamed on into pg_restore: nothing on disk). Leaving early kills
        restic; a stream that ended with a restic failure raises ``ResticError``."""
        args = ["dump", snapshot, filename]
        with self._spawn(args, stdin=False) as (proc, drained):
            assert proc.stdout is not None
            stdout = proc.stdout

            def chunks() -> Iterator[bytes]:
                while True:
                    chunk = stdout.read(1 << 20)
                    if not chunk:
                        break
                    yield chunk
                self._finish(proc, drained, args, TIMEOUT_LONG, stdout_read=True)

            yield chunks()

    @contextlib.contextmanager
    def _spawn(self, args: Sequence[str], *, stdin: bool
               ) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, bytes]]]:
        """A restic child with pipes; stderr (and stdout when stdin is ours) drained by
        threads so neither side can block on a full pipe. Killed if still running at the
        end of the block."""
        import threading

        with _secret_fds([self.password]) as fds:
            argv = [self.binary, "--repo", self.location, "--password-file",
                    f"/dev/fd/{fds[0]}", "--quiet"]
            argv += ["--cache-dir", str(self.cache_dir)] if self.cache_dir else ["--no-cache"]
            argv += list(args)
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self._base_env(),
                    pass_fds=fds)
            except FileNotFoundError:
                raise ResticError(f"the restic program was not found ({self.binary}); "
                                  "install Debian's restic package") from None
        drained: dict[str, bytes] = {}
        readers: list[threading.Thread] = []
        streams = [("stderr", proc.stderr)] + ([("stdout", proc.stdout)] if stdin else [])
        for name, stream in streams:
            assert stream is not None

            def drain(name: str = name, stream: Any = stream) -> None:
                drained[name] = stream.read()

            reader = threading.Thread(target=drain, daemon=True)
            reader.start()
            readers.append(reader)
        try:
            yield proc, drained
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for reader in readers:
                reader.join(5)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    def _finish(self, proc: subprocess.Popen[bytes], drained: dict[str, bytes],
                args: Sequence[str], timeout: float, *, stdout_read: bool = False) -> bytes:
        """Wait for a spawned restic; its stdout, or ResticError (one line)."""
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise ResticError(f"restic {args[0]} did not finish within {int(timeout)} s"
                              ) from None
        deadline = time.monotonic() + 10
        while "stderr" not in drained and time.monotonic() < deadline:
            time.sleep(0.01)
        while not stdout_read and "stdout" not in drained and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.returncode != 0:
            message = _one_line(drained.get("stderr", b"").decode("utf-8", "replace"))
            raise ResticError(f"restic {args[0]} failed: {message}")
        return drained.get("stdout", b"")

    def snapshots(self, tag: str | None = None) -> list[dict[str, Any]]:
        args = ["snapshots"] + (["--tag", tag] if tag else [])
        value = self.json(args)
        return [s for s in value or [] if isinstance(s, dict)]

    def forget(self, ids: Sequence[str]) -> None:
        if ids:
            self.run(["forget", *ids], timeout=TIMEOUT_LONG)

    def forget_policy(self, tag: str, keep: dict[str, int]) -> None:
        # by host only: each data snapshot also carries its own run-* tag (which pairs it
        # with a PostgreSQL index dump), so grouping by tags would keep every one
        args = ["forget", "--tag", tag, "--group-by", "host"]
        for name, count in keep.items():
            if count > 0:
                args += [f"--keep-{name}", str(count)]
        self.run(args, timeout=TIMEOUT_LONG)

    def prune(self, *, thorough: bool = False) -> None:
        """Remove unreferenced data. ``thorough``: repack every pack holding any unused
        blob (``--max-unused 0``), not only the fully unused ones: used after an erasure,
        so no destroyed key survives in a partly used pack."""
        self.run(["prune", *(["--max-unused", "0"] if thorough else [])],
                 timeout=TIMEOUT_LONG)

    def check(self, read_data: bool) -> None:
        self.run(["check", *(["--read-data"] if read_data else [])], timeout=TIMEOUT_LONG)

    def restore(self, snapshot: str, target: Path) -> None:
        self.run(["restore", snapshot, "--target", str(target)], timeout=TIMEOUT_LONG)

    def dump(self, snapshot: str, filename: str) -> bytes:
        return self.run(["dump", snapshot, filename]).stdout

    def unlock(self) -> None:
        """Remove stale locks left by a killed run (restic keeps live ones)."""
        with contextlib.suppress(ResticError):
            self.run(["unlock"])


def _summary(items: list[dict[str, Any]]) -> dict[str, Any]:
    for item in reversed(items):
        if item.get("message_type") == "summary":
            return dict(item)
    raise ResticError("restic backup gave no summary")
