"""``pacsvault service install``: run pacsvault as a hardened system service."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import Any

from pacsvault.cli.common import CommandError


def register(sub: Any) -> None:
    p = sub.add_parser("service", help="install pacsvault as a system service (systemd)")
    ssub = p.add_subparsers(dest="service_command", required=True, metavar="ACTION")
    inst = ssub.add_parser(
        "install",
        help="as root: create the 'pacsvault' system user, /var/lib/pacsvault, "
        "/etc/pacsvault and the systemd unit, create the vault, start it",
    )
    inst.add_argument("--user", default="pacsvault", help="service user (default pacsvault)")
    inst.add_argument("--root", type=Path, default=Path("/"),
                      help="install under this prefix instead of / (tests, images)")
    inst.add_argument("--python", type=Path, default=None,
                      help="interpreter the service runs (default: this one)")
    inst.add_argument("--pythonpath", default=None,
                      help="PYTHONPATH for that interpreter (only for one outside the venv)")
    inst.add_argument("--memory-max", default="4G", help="systemd MemoryMax (default 4G)")
    inst.add_argument("--admin", metavar="NAME", help="first administrator's name")
    inst.add_argument("--no-start", action="store_true",
                      help="do not enable and start the unit")
    from pacsvault.cli.alertscmd import add_init_args

    add_init_args(inst)  # who is told of an alert (issue 19): asked at a terminal
    inst.set_defaults(func=cmd_install)


def cmd_install(args: argparse.Namespace) -> int:
    from pacsvault.cli.alertscmd import forward_args
    from pacsvault.service.install import InstallError, Layout, Options, install

    opts = Options(Layout(args.root.absolute(), args.user),
                   python=args.python or Path(sys.executable), pythonpath=args.pythonpath,
                   memory_max=args.memory_max, start=not args.no_start, admin=args.admin,
                   init_args=tuple(forward_args(args, ask=True)))
    try:
        done = install(opts)
    except InstallError as exc:
        raise CommandError(str(exc)) from None
    port = _https_port(Path(done["data"]))
    print(f"pacsvault is installed as a service (user {done['user']}).")
    print(f"  Data:      {done['data']}")
    print(f"  Key:       {done['key']} (back it up apart from the data)")
    print(f"  Settings:  {done['config']} and {done['data']}/pacsvault.toml")
    print(f"  Open:      https://{socket.getfqdn()}:{port}/")
    print(f"  CA file:   {done['ca']} (install it on the practice's computers)")
    if done["secrets"]:
        print(f"  Secrets:   {done['secrets']} (recovery code, first administrator: read "
              "it, write the code down, then shred -u it)")
    if done["started"] == "yes":
        print("  Running:   systemctl status pacsvault; logs: journalctl -u pacsvault")
    else:
        print("  systemd is not running here (or --no-start): start the server with")
        print(f"    {done['start']}")
    return 0


def _https_port(data: Path) -> int:
    from pacsvault.config import ConfigError, load

    try:
        return load(data).web.https_port
    except (ConfigError, OSError):  # only for the summary line
        return 8443
