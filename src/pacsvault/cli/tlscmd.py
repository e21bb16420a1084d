"""``pacsvault tls rotate-ca``: replace an older vault's unconstrained CA.

Vaults made before issue 11 have a CA without name constraints: installed on the practice's
PCs, its key could vouch for any web site. New vaults get a constrained CA; this command
gives an existing vault one (``status`` says when it is needed). It is disruptive by
nature, so it asks for ``--yes`` and says what to do next.
"""

from __future__ import annotations

import argparse
from typing import Any

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.cli.common import CommandError, add_data_args, open_vault, say
from pacsvault.crypto.tls import ca_is_name_constrained, rotate_authority


def register(sub: Any) -> None:
    tls = sub.add_parser("tls", help="the vault's certificate authority")
    tsub = tls.add_subparsers(dest="tls_command", required=True, metavar="ACTION")
    p = tsub.add_parser(
        "rotate-ca", help="replace the CA by a new name-constrained one",
        description="Creates a new CA (name-constrained), server and client certificates; "
        "the old ones move to tls/retired-<time>/. Every node certificate is revoked: "
        "re-issue them with 'pacsvault node cert', install the new tls/ca.crt on the "
        "practice's computers, then restart the server.")
    add_data_args(p)
    p.add_argument("--yes", action="store_true", help="really do it")
    p.add_argument("--force", action="store_true",
                   help="rotate even if the CA is already name-constrained")
    p.set_defaults(func=cmd_rotate_ca)


def cmd_rotate_ca(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    try:
        paths = vault.layout.tls
        if ca_is_name_constrained(paths) and not args.force:
            say("The CA already has name constraints: nothing to do (--force to rotate anyway).")
            return 0
        if not args.yes:
            raise CommandError(
                "this replaces the CA: every node certificate must be re-issued and every "
                "computer must trust the new tls/ca.crt; run again with --yes")
        retired = rotate_authority(paths, vault.tls_password(), vault.settings.server.ae_title)
        revoked = sum(vault.nodes.revoke(n.ae_title) for n in vault.nodes.all())
        vault.publish_crl()
        vault.recorder.emit(AuditEvent(
            action="tls.ca.rotate", outcome=Outcome.SUCCESS, code=EventCode.SECURITY_ALERT,
            actor_user="local-admin", detail={"revoked_node_certs": str(revoked)}))
    finally:
        vault.close()
    say(f"New CA in {paths.ca_cert} (the old one is in {retired}). {revoked} node "
        "certificate(s) revoked: re-issue them with 'pacsvault node cert AE --out DIR', "
        "install the new ca.crt on the practice's computers, and restart the server.")
    return 0
