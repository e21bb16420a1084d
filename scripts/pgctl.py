"""Start and stop a real, throwaway PostgreSQL for the tests and benchmarks (issue 16).

    scripts/postgres.sh start DIR [--port P]    prints the connection facts as JSON
    scripts/postgres.sh stop DIR

``start`` on a new DIR runs Debian's ``initdb`` and configures the server the way a
deployment should be: listening on 127.0.0.1 and a Unix socket in DIR only, TLS on (a
throwaway CA in DIR, TLS >= 1.2), SCRAM passwords, TCP only through ``hostssl`` (a plain TCP
connection finds no pg_hba line and is refused). It creates the role and database
``pacsvault`` (CREATEDB, so that tests can make a fresh database each) with a random
password written to DIR/password and a libpq passfile DIR/pgpass (both 0600): the password
never appears on a command line. ``start`` on an existing DIR starts the same cluster again
on the same port (the "PostgreSQL restarted during ingest" tests), ``stop`` stops it by the
PID in ``postmaster.pid`` (``pg_ctl stop -m fast``, then SIGTERM/SIGKILL).

``initdb`` refuses root, so as root the cluster belongs to the system user ``pvpgtest``
(created when missing, no login shell, no home) and DIR is given to it; DIR's parents must
let that user through (a fresh directory under /tmp does; pytest's 0700 basetemp does not).
As any other user the cluster is that user's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pvtestca import make_server_tls, write_private

SERVICE_USER = "pvpgtest"
ROLE = DATABASE = "pacsvault"
FACTS = "connection.json"


def pg_bin() -> Path:
    """Debian's newest PostgreSQL binaries (``$PACSVAULT_PG_BIN`` overrides)."""
    env = os.environ.get("PACSVAULT_PG_BIN")
    if env:
        return Path(env)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    if not found:
        sys.exit("PostgreSQL not installed (no /usr/lib/postgresql/*/bin/initdb): "
                 "apt-get install -y postgresql (scripts/install.sh --test does)")
    return found[-1].parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_user() -> pwd.struct_passwd:
    """The unprivileged owner of the cluster: ourselves, or ``pvpgtest`` as root."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", SERVICE_USER], check=True)
        return pwd.getpwnam(SERVICE_USER)


def run_as(user: pwd.struct_passwd, argv: list[str], cwd: Path, *, stdin: str | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the cluster's owner (dropping root if we are root)."""
    kwargs: dict[str, Any] = {}
    if os.geteuid() == 0:
        kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8",
           "HOME": str(cwd), "USER": user.pw_name}
    return subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout, check=False, **kwargs)


def check(proc: subprocess.CompletedProcess[str], what: str) -> None:
    if proc.returncode != 0:
        sys.exit(f"{what} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")


def facts(d: Path, port: int) -> dict[str, Any]:
    ca = d / "ca.crt"
    return {
        "url": f"postgresql://{ROLE}@127.0.0.1:{port}/{DATABASE}"
               f"?sslmode=verify-full&sslrootcert={quote(str(ca))}",
        "host": "127.0.0.1", "port": port, "socket_dir": str(d), "database": DATABASE,
        "user": ROLE, "password_file": str(d / "password"), "passfile": str(d / "pgpass"),
        "ca_file": str(ca), "data_dir": str(d / "data"), "log_file": str(d / "postgres.log"),
        "bin_dir": str(pg_bin()),
    }


def init_cluster(d: Path, user: pwd.struct_passwd, port: int) -> None:
    bindir = pg_bin()
    if os.geteuid() == 0:
        os.chown(d, user.pw_uid, user.pw_gid)
    d.chmod(0o700)
    probe = run_as(user, ["test", "-w", str(d)], Path("/"))
    if probe.returncode != 0:
        sys.exit(f"{d} is not reachable by the user {user.pw_name}: use a directory whose "
                 "parents it may traverse (e.g. a fresh one under /tmp)")
    check(run_as(user, [str(bindir / "initdb"), "-D", str(d / "data"), "--encoding=UTF8",
                        "--locale=C.UTF-8", "--auth-local=peer", "--auth-host=reject",
                        "--no-instructions"], d), "initdb")
    _ca, cert, key = make_server_tls(d, "PostgreSQL")
    if os.geteuid() == 0:
        for p in (cert, key):
            os.chown(p, user.pw_uid, user.pw_gid)
    conf = d / "data" / "postgresql.conf"
    with conf.open("a") as f:
        f.write(f"""
# pacsvault test server (scripts/pgctl.py): loopback + socket only, TLS, SCRAM
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{d}'
unix_socket_permissions = 0777
ssl = on
ssl_cert_file = '{cert}'
ssl_key_file = '{key}'
ssl_min_protocol_version = 'TLSv1.2'
password_encryption = 'scram-sha-256'
max_connections = 200
""")
    # Only the cluster's owner over the socket without a password (peer); everyone else
    # with SCRAM, and over TCP only inside TLS: no 'host' line, so plain TCP is refused.
    (d / "data" / "pg_hba.conf").write_text(
        f"local all {user.pw_name} peer\n"
        "local all all scram-sha-256\n"
        "hostssl all all 127.0.0.1/32 scram-sha-256\n")


def create_role(d: Path, user: pwd.struct_passwd, port: int) -> None:
    password = secrets.token_urlsafe(32)  # no ':' or '\\': safe in a passfile as is
    sql = (f"SET password_encryption = 'scram-sha-256';\n"
           f"CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{password}';\n"
           f"CREATE DATABASE {DATABASE} OWNER {ROLE};\n")
    # the password goes to psql on stdin, never on argv
    check(run_as(user, [str(pg_bin() / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                        "-h", str(d), "-p", str(port), "-d", "postgres"], d, stdin=sql),
          "creating the pacsvault role and database")
    write_private(d / "password", (password + "\n").encode())
    write_private(d / "pgpass", (f"127.0.0.1:{port}:*:{ROLE}:{password}\n"
                                 f"localhost:{port}:*:{ROLE}:{password}\n"
                                 f"{d}:{port}:*:{ROLE}:{password}\n").encode())


def postmaster_pid(d: Path) -> int | None:
    try:
        return int((d / "data" / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return b"postgres" in cmd and state != "Z"


def start(d: Path, port: int | None) -> dict[str, Any]:
    d = d.resolve()
    d.mkdir(parents=True, exist_ok=True)
    user = cluster_user()
    known = d / FACTS
    fresh = not (d / "data" / "PG_VERSION").exists()
    if fresh:
        port = port or free_port()
        init_cluster(d, user, port)
    else:
        port = int(json.loads(known.read_text())["port"])
    pid = postmaster_pid(d)
    if pid is None or not alive(pid):
        check(run_as(user, [str(pg_bin() / "pg_ctl"), "-D", str(d / "data"), "-l",
                            str(d / "postgres.log"), "-w", "-t", "60", "start"], d),
              "pg_ctl start")
    if fresh:
        try:
            create_role(d, user, port)
        except BaseException:  # never leave a half-made server running
            stop(d)
            raise
    info = facts(d, port)
    info["pid"] = postmaster_pid(d)
    write_private(known, json.dumps(info, indent=2).encode(), 0o644)
    return info


def stop(d: Path) -> None:
    d = d.resolve()
    pid = postmaster_pid(d)
    if pid is None or not alive(pid):
        return
    owner = pwd.getpwuid((d / "data").stat().st_uid)
    run_as(owner, [str(pg_bin() / "pg_ctl"), "-D", str(d / "data"), "-m", "fast", "-w",
                   "-t", "30", "stop"], d, timeout=60)
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        if not alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    if alive(pid):
        sys.exit(f"PostgreSQL (pid {pid}) did not stop")


def main() -> None:
    ap = argparse.ArgumentParser(prog="postgres.sh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["start", "stop"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--port", type=int, default=None, help="TCP port on 127.0.0.1 "
                    "(default: a free one; an existing DIR keeps its port)")
    args = ap.parse_args()
    if args.action == "start":
        print(json.dumps(start(args.dir, args.port), indent=2))
    else:
        stop(args.dir)


if __name__ == "__main__":
    main()
