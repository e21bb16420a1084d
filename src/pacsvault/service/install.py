"""``pacsvault service install``: the Debian-style layout and a hardened systemd unit.

What it makes (``--root`` prefixes every path, for tests)::

    user pacsvault            system user and group, no login shell, no home
    /var/lib/pacsvault/       the data dir, 0700, owned by the service user
    /etc/pacsvault/           0755 root: pacsvault.toml (names data dir, key file, user)
    /etc/pacsvault/keys/      0700, owned by the service user: master.key (0600) and the
                              one-time secrets file of the first run; outside the data dir
    /var/cache/pacsvault/     the OHIF viewer's files (copied from the installing user's cache)
    /etc/systemd/system/pacsvault.service

The vault is created by ``init`` run **as the service user** (never root-owned files in
it). Safe to run again: existing users, directories, keys and vaults are kept.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

DEFAULT_USER = "pacsvault"
UNIT_NAME = "pacsvault.service"
SYSTEMD_RUNNING = Path("/run/systemd/system")
NOLOGIN = "/usr/sbin/nologin"


class InstallError(Exception):
    """The installation cannot go on (message is user-facing)."""


@dataclass(frozen=True)
class Layout:
    """Every path of an installation under ``root`` ("/" in production)."""

    root: Path
    user: str = DEFAULT_USER

    def _at(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    @property
    def etc(self) -> Path:
        return self._at("/etc/pacsvault")

    @property
    def config(self) -> Path:
        return self.etc / "pacsvault.toml"

    @property
    def keys(self) -> Path:
        return self.etc / "keys"

    @property
    def key(self) -> Path:
        return self.keys / "master.key"

    @property
    def data(self) -> Path:
        return self._at("/var/lib/pacsvault")

    @property
    def cache(self) -> Path:
        return self._at(f"/var/cache/{self.user}")

    @property
    def unit(self) -> Path:
        return self._at(f"/etc/systemd/system/{UNIT_NAME}")


@dataclass
class Options:
    layout: Layout
    python: Path = field(default_factory=lambda: Path(sys.executable))
    pythonpath: str | None = None  # for an interpreter outside the venv (tests)
    memory_max: str = "4G"
    start: bool = True
    admin: str | None = None
    # The alert channel for ``init`` (its --alert-*/--smtp-*/--no-alerts flags, issue 19).
    init_args: tuple[str, ...] = ()


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def render_unit(opts: Options) -> str:
    """The shipped unit with this installation's user, paths and interpreter."""
    layout = opts.layout
    template = resources.files("pacsvault.service").joinpath(UNIT_NAME).read_text("utf-8")
    env = f"Environment=PYTHONPATH={opts.pythonpath}" if opts.pythonpath else ""
    for name, value in (
        ("USER", layout.user), ("CONFIG", str(layout.config)), ("ENVIRONMENT", env),
        ("PYTHON", str(opts.python)), ("DATA", str(layout.data)), ("KEY", str(layout.key)),
        ("MEMORY_MAX", opts.memory_max),
    ):
        if any(c.isspace() or c in "\"'\\%$;" for c in value) and name != "ENVIRONMENT":
            raise InstallError(f"{name.lower()} {value!r}: paths and names with spaces, "
                               "quotes or shell characters are not supported in the unit")
        template = template.replace(f"@{name}@", value)
    return template


def system_config(layout: Layout) -> str:
    return (
        "# pacsvault system settings, written by 'pacsvault service install'. No secret here:\n"
        "# every pacsvault command run without --data uses this data dir and key file.\n"
        f'data_dir = "{layout.data}"\n'
        f'key_file = "{layout.key}"\n'
        f'user = "{layout.user}"\n'
    )


def ensure_user(name: str) -> pwd.struct_passwd:
    """The service's system user and group (created once, never a login)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    shell = NOLOGIN if Path(NOLOGIN).exists() else "/bin/false"
    for attempt in range(5):
        proc = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
             "/nonexistent", "--shell", shell, "--comment", "pacsvault archive", name],
            capture_output=True, text=True, check=False,
        )
        # /etc/passwd is locked while another tool edits it: try again shortly.
        if proc.returncode == 0 or "lock" not in proc.stderr.lower():
            break
        time.sleep(0.5 * (attempt + 1))
    if proc.returncode != 0:
        raise InstallError(f"useradd {name} failed: {proc.stderr.strip()}")
    say(f"  created system user {name} (no login shell, no home)")
    return pwd.getpwnam(name)


def _dir(path: Path, mode: int, uid: int, gid: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise InstallError(f"{path} is not a directory")
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, "utf-8")
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def as_user(opts: Options, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m pacsvault ARGS`` as the service user, with a clean environment."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "PACSVAULT_CONFIG": str(opts.layout.config),
           "XDG_CACHE_HOME": str(opts.layout.cache)}
    if opts.pythonpath:
        env["PYTHONPATH"] = opts.pythonpath
    return subprocess.run(
        ["runuser", "-u", opts.layout.user, "--", "env", "-i",
         *[f"{k}={v}" for k, v in env.items()], str(opts.python), "-m", "pacsvault", *args],
        capture_output=True, text=True, check=False, cwd="/", timeout=600,
    )


def _copy_viewer(layout: Layout, uid: int, gid: int) -> None:
    """The OHIF files that ``scripts/install.sh`` cached for root, for the service."""
    import platformdirs

    source = Path(platformdirs.user_cache_dir("pacsvault")) / "viewer"
    target = layout.cache / "pacsvault" / "viewer"
    if not source.is_dir():
        say("  viewer: not cached here (run 'pacsvault viewer install' as the service user "
            f"with XDG_CACHE_HOME={layout.cache} to add it)")
        return
    if not target.exists():
        shutil.copytree(source, target, symlinks=True)
    for path in [layout.cache, *layout.cache.rglob("*")]:
        os.chown(path, uid, gid, follow_symlinks=False)
    os.chmod(layout.cache, 0o700)
    say(f"  viewer: {target}")


def install(opts: Options) -> dict[str, str]:
    """Make the layout, the vault and the unit; start it when systemd runs. Returns the
    paths to tell the administrator about."""
    if os.geteuid() != 0:
        raise InstallError("run 'pacsvault service install' as root (it creates a system "
                           "user and directories under /etc and /var/lib)")
    layout = opts.layout
    say(f"Installing pacsvault as a service (user {layout.user}):")
    user = ensure_user(layout.user)
    uid, gid = user.pw_uid, user.pw_gid
    _dir(layout.etc, 0o755, 0, 0)
    _dir(layout.keys, 0o700, uid, gid)
    _dir(layout.data, 0o700, uid, gid)
    _dir(layout.cache, 0o700, uid, gid)
    _write(layout.config, system_config(layout))
    say(f"  settings: {layout.config}")
    say(f"  data: {layout.data} (0700, {layout.user})")
    places = [str(opts.python), *(opts.pythonpath or "").split(":")]
    hidden = [p for p in places
              if p and Path(p).absolute().parts[1:2] in {("home",), ("root",), ("run",)}]
    if hidden:
        raise InstallError(
            f"{hidden[0]} is under /home, /root or /run, which the unit hides "
            "(ProtectHome): clone pacsvault to /opt/pacsvault and run scripts/install.sh "
            "there (scripts/serve.sh does this by itself)")
    check = as_user(opts, "--version")
    if check.returncode != 0:
        raise InstallError(
            f"the service user {layout.user} cannot run {opts.python}: "
            f"{(check.stderr or check.stdout).strip()[-300:]}. Put pacsvault where every "
            "user can read it (e.g. clone it to /opt/pacsvault and run scripts/install.sh "
            "there), not under /root or a home directory.")
    _copy_viewer(layout, uid, gid)
    secrets = ""
    if (layout.data / "vault.json").exists():
        say(f"  vault: already there in {layout.data} (kept)")
    else:
        say("  vault: creating it (keys, certificates, first administrator) ...")
        admin = ("--admin", opts.admin) if opts.admin else ()
        proc = as_user(opts, "init", "--data", str(layout.data), "--key-file",
                       str(layout.key), *admin, *opts.init_args)
        if proc.returncode != 0:
            raise InstallError(f"init failed: {proc.stderr.strip()}")
        secrets = proc.stdout.strip().splitlines()[-1].strip()
    unit = render_unit(opts)
    layout.unit.parent.mkdir(parents=True, exist_ok=True)
    _write(layout.unit, unit)
    say(f"  unit: {layout.unit}")
    started = False
    if opts.start and layout.root == Path("/") and SYSTEMD_RUNNING.is_dir():
        for cmd in (["systemctl", "daemon-reload"],
                    ["systemctl", "enable", "--now", UNIT_NAME]):
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise InstallError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
        started = True
        say("  started: systemctl status pacsvault; logs: journalctl -u pacsvault")
    return {
        "user": layout.user, "data": str(layout.data), "key": str(layout.key),
        "config": str(layout.config), "unit": str(layout.unit),
        "ca": str(layout.data / "tls" / "ca.crt"), "secrets": secrets,
        "started": "yes" if started else "no",
        "start": f"runuser -u {layout.user} -- {run_command(opts)}",
    }


def run_command(opts: Options) -> str:
    """How to run the server by hand as the service user (no systemd running)."""
    env = f"PYTHONPATH={opts.pythonpath} " if opts.pythonpath else ""
    return (f"env {env}PACSVAULT_CONFIG={opts.layout.config} "
            f"XDG_CACHE_HOME={opts.layout.cache} {opts.python} -m pacsvault serve "
            f"--data {opts.layout.data} --key-file {opts.layout.key}")

