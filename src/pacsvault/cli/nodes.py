"""``pacsvault node add|list|remove|cert``: the allow-list of DICOM peers."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.cli.common import CommandError, add_data_args, open_vault, say
from pacsvault.cli.listing import print_table, read_vault
from pacsvault.cli.outputs import private_umask, restrict_files
from pacsvault.crypto.tls import NODE_DAYS, issue_node
from pacsvault.index.nodes import (
    DEFAULT_ROLES,
    ROLES,
    TLS_PROFILE_LEGACY,
    TLS_PROFILE_STRICT,
    TLS_PROFILES,
    NodeInfo,
    check_ae_title,
    check_host,
    parse_roles,
)

TLS_PROFILE_HELP = (
    "DICOM TLS profile: bcp195 (default; TLS 1.2/1.3, ECDHE AEAD suites) or legacy-aes, "
    "the retired AES profile (TLS_RSA_WITH_AES_128_CBC_SHA, no forward secrecy) for this "
    "old modality only, from its host only; recorded and shown as a warning")


def register(sub: Any) -> None:
    node = sub.add_parser("node", help="register the modalities and workstations allowed in")
    nsub = node.add_subparsers(dest="node_command", required=True, metavar="ACTION")

    p = nsub.add_parser("add", help="allow a DICOM node (AE title + host)")
    add_data_args(p)
    p.add_argument("ae_title")
    p.add_argument("--host", required=True, help="the node's IP address or host name")
    p.add_argument("--port", type=int, help="the node's own DICOM port (for retrieval)")
    p.add_argument("--tls", action="store_true", help="node must use the DICOM TLS port")
    p.add_argument("--client-cert", action="store_true",
                   help="node must present a client certificate from this vault's CA")
    p.add_argument("--roles", default=",".join(DEFAULT_ROLES),
                   help=f"comma-separated among {', '.join(ROLES)} (default: store)")
    p.add_argument("--tls-profile", choices=TLS_PROFILES, default=TLS_PROFILE_STRICT,
                   help=TLS_PROFILE_HELP)
    p.set_defaults(func=cmd_add)

    p = nsub.add_parser("set", help="change a node's host, port, transport or roles")
    add_data_args(p)
    p.add_argument("ae_title")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--client-cert", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--roles", help=f"comma-separated among {', '.join(ROLES)}")
    p.add_argument("--tls-profile", choices=TLS_PROFILES, default=None, help=TLS_PROFILE_HELP)
    p.set_defaults(func=cmd_set)

    p = nsub.add_parser("list", help="list registered nodes")
    add_data_args(p)
    p.set_defaults(func=cmd_list)

    p = nsub.add_parser("remove", help="remove a node")
    add_data_args(p)
    p.add_argument("ae_title")
    p.set_defaults(func=cmd_remove)

    p = nsub.add_parser(
        "cert", help="issue a node's TLS client certificate, or revoke its certificates",
        description="Issue a client certificate bound to the node (CN and URI SAN = AE "
        f"title, client authentication only, valid {NODE_DAYS} days); a TLS node with a "
        "port also gets a listener certificate for its C-MOVE destination. --revoke "
        "revokes every certificate issued to the node (the CRL tls/crl.pem is re-signed; "
        "a running server refuses them from the next association).")
    add_data_args(p)
    p.add_argument("ae_title")
    p.add_argument("--out", type=Path, help="directory to write key and certs")
    p.add_argument("--revoke", action="store_true",
                   help="revoke every certificate issued to this node")
    p.set_defaults(func=cmd_cert)


def _changed(action: str, ae_title: str, **detail: str | bool) -> AuditEvent:
    return AuditEvent(action=action, outcome=Outcome.SUCCESS, code=EventCode.SECURITY_ALERT,
                      actor_user="local-admin", detail={"node": ae_title, **detail})


def _profile_event(info: NodeInfo) -> AuditEvent:
    """The opt-in (or its withdrawal) is a security decision: recorded on its own."""
    return AuditEvent(
        action="node.tls_profile",
        outcome=Outcome.MINOR_FAILURE if info.legacy_tls else Outcome.SUCCESS,
        code=EventCode.SECURITY_ALERT, actor_user="local-admin",
        message=(f"node {info.ae_title} may use the retired AES TLS profile "
                 "(TLS_RSA_WITH_AES_128_CBC_SHA) from its host" if info.legacy_tls else
                 f"node {info.ae_title} uses the strict BCP 195 TLS profile"),
        detail={"node": info.ae_title, "profile": info.tls_profile, "host": info.host},
    )


def cmd_add(args: argparse.Namespace) -> int:
    # Refuse a bad definition before the vault is opened (the registry checks again).
    check_ae_title(args.ae_title)
    check_host(args.host, tls=args.tls or args.client_cert)
    parse_roles(args.roles)
    vault = open_vault(args)
    try:
        info = vault.nodes.add(
            args.ae_title, args.host, args.port, tls=args.tls or args.client_cert,
            client_cert=args.client_cert, roles=parse_roles(args.roles),
            tls_profile=args.tls_profile,
        )
        vault.recorder.emit(_changed("node.add", info.ae_title, roles=",".join(info.roles)))
        if info.legacy_tls:
            vault.recorder.emit(_profile_event(info))
    finally:
        vault.close()
    say(f"Node {info.ae_title} at {info.host} registered with roles {','.join(info.roles)}"
        + (" (TLS only)" if info.tls else "") + ".")
    if info.client_cert:
        say(f"Issue its certificate with 'pacsvault node cert {info.ae_title} --out DIR'.")
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    try:
        before = vault.nodes.get(args.ae_title)
        info = vault.nodes.update(
            args.ae_title, host=args.host, port=args.port, tls=args.tls,
            client_cert=args.client_cert,
            roles=parse_roles(args.roles) if args.roles else None,
            tls_profile=args.tls_profile,
        )
        vault.recorder.emit(_changed("node.set", info.ae_title, roles=",".join(info.roles),
                                     tls=info.tls, client_cert=info.client_cert))
        if before is not None and (before.tls_profile != info.tls_profile
                                   or (info.legacy_tls and before.host != info.host)):
            vault.recorder.emit(_profile_event(info))
    finally:
        vault.close()
    say(f"Node {info.ae_title}: host {info.host}, port {info.port or '-'}, roles "
        f"{','.join(info.roles)}" + (", TLS only" if info.tls else "")
        + (f", TLS profile {TLS_PROFILE_LEGACY} (retired, no forward secrecy)"
           if info.legacy_tls else "") + ".")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    return print_table(
        read_vault(args, lambda vault: vault.nodes.all()),
        empty="No node registered: every DICOM association is refused.",
        header=f"{'AE title':<16}  {'host':<24} {'port':>5}  {'tls':<3}  {'cert':<4}  "
        f"{'profile':<10}  roles",
        row=lambda n: (f"{n.ae_title:<16}  {n.host:<24} {n.port or '':>5}  "
                       f"{'yes' if n.tls else 'no':<3}  {'yes' if n.client_cert else 'no':<4}  "
                       f"{(n.tls_profile if n.tls else '-'):<10}  {','.join(n.roles)}"))


def cmd_remove(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    try:
        revoked = vault.nodes.remove(args.ae_title)
        vault.recorder.emit(_changed("node.remove", args.ae_title.strip(),
                                     revoked_certs=str(revoked)))
    finally:
        vault.close()
    say(f"Node {args.ae_title.strip()} removed.")
    return 0


def cmd_cert(args: argparse.Namespace) -> int:
    ae_title = check_ae_title(args.ae_title)
    if args.revoke == (args.out is not None):
        raise CommandError("give either --out DIR (issue) or --revoke")
    vault = open_vault(args)
    try:
        if args.revoke:
            count = vault.nodes.revoke(ae_title)
            vault.recorder.emit(_changed("node.cert.revoke", ae_title, count=str(count)))
            say(f"{count} certificate(s) of {ae_title} revoked"
                + ("; the CRL is re-signed." if count else "."))
            return 0
        node = vault.nodes.get(ae_title)
        if node is None:
            raise CommandError(f"no node named {ae_title}; add it first")
        listener = node.tls and node.port is not None
        with private_umask():  # owner-only, whatever writes them (issue 11, defect 10)
            issued = issue_node(vault.layout.tls, vault.tls_password(), ae_title, node.host,
                                args.out, listener=listener)
        # files an older version left there keep their mode when rewritten: set it
        restrict_files([args.out / "ca.crt", *(c.path for c in issued),
                        *(c.path.with_suffix(".key") for c in issued)])
        vault.nodes.record_certificates(ae_title, issued)
        vault.recorder.emit(_changed("node.cert", ae_title,
                                     serials=",".join(f"{c.serial:x}" for c in issued)))
    finally:
        vault.close()
    say("Wrote " + ", ".join(str(c.path) for c in issued) + f" and the CA in {args.out}. "
        "Install them on the node; the .key files are secret.")
    if listener and not any(c.kind == "listener" for c in issued):
        say(f"No listener certificate: the CA may not certify the host {node.host} (use its "
            "IP address on the practice network).")
    return 0
