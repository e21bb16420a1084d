"""``pacsvault viewer``: install the pinned OHIF viewer into the cache, or say where it is.

Called by ``scripts/install.sh``; safe to run again (an intact install is kept as is).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pacsvault.cli.common import CommandError, say
from pacsvault.viewer import PINNED, ViewerError, default_dir, install, load


def register(sub: Any) -> None:
    viewer = sub.add_parser("viewer", help="the OHIF web viewer (install, status)")
    vsub = viewer.add_subparsers(dest="viewer_command", required=True, metavar="ACTION")
    p = vsub.add_parser("install", help=f"fetch, verify and cache OHIF {PINNED.version}")
    p.add_argument("--dir", type=Path, help=f"install there (default: {default_dir()})")
    p.add_argument("--from-tarball", type=Path,
                   help="use this local copy of the release (checked all the same)")
    p.set_defaults(func=cmd_install)
    p = vsub.add_parser("status", help="is the viewer installed, and where")
    p.add_argument("--dir", type=Path)
    p.set_defaults(func=cmd_status)


def cmd_install(args: argparse.Namespace) -> int:
    try:
        where = install(args.dir, tarball=args.from_tarball)
    except (ViewerError, OSError) as exc:
        raise CommandError(f"viewer not installed: {exc}") from None
    say(f"OHIF viewer {PINNED.version} ready in {where}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    dist = load(args.dir)
    if dist is None:
        say(f"OHIF viewer {PINNED.version} is not installed: run `pacsvault viewer install`")
        return 1
    say(f"OHIF viewer {dist.version} installed in {dist.root}")
    return 0
