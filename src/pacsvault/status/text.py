"""The status report as ``pacsvault status`` prints it: text lines and the ``--json`` form.

The text is for the IT provider at a terminal (a label column, one fact per line, every
warning on its own ``Warning`` line); the JSON keeps the keys scripts already read. The
Health page renders the same ``StatusReport`` with its template (``web/admin_health``).
"""

from __future__ import annotations

from typing import Any

from pacsvault.backup.health import status_lines as backup_lines
from pacsvault.status.report import StatusReport

SEALED_ADVICE = ("SEALED: images from registered devices are received and kept encrypted; "
                 "queries, retrievals and the web pages are refused until an "
                 "administrator runs 'pacsvault unseal' (or opens /unseal on the HTTPS port)")


def size(n: int) -> str:
    """Bytes for a person: ``512 B``, ``1.5 MB``."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def as_json(report: StatusReport) -> dict[str, Any]:
    """``pacsvault status --json``."""
    server = report.certificate("server")
    return {
        "data": str(report.data),
        "ae_title": report.ae_title,
        "server": ({"running": True, **report.server} if report.server_alive
                   else {"running": False}),
        "configured": {
            "bind": report.configured.bind,
            "dicom_port": report.configured.dicom_port,
            "dicom_tls_port": report.configured.dicom_tls_port,
            "https_port": report.configured.https_port,
        },
        "nodes": [
            {"ae_title": n.ae_title, "host": n.host, "port": n.port, "tls": n.tls,
             "client_cert": n.client_cert, "roles": list(n.roles)}
            for n in report.nodes
        ],
        # per-node downgrades to the retired AES TLS profile (issue 13, defect 7)
        "legacy_tls_nodes": [{"ae_title": n.ae_title, "host": n.host}
                             for n in report.legacy_tls_nodes],
        "counts": {"patients": report.counts.patients, "studies": report.counts.studies,
                   "series": report.counts.series, "instances": report.counts.instances},
        "storage": {"received_bytes": report.storage.received,
                    "encrypted_bytes": report.storage.encrypted},
        "certificate_expires": (server.expires.isoformat(timespec="seconds")
                                if server is not None and server.expires else None),
        "ca_name_constraints": report.ca_name_constraints,
        # how the master key is held and where (issue 14, key protection)
        "key": {"protection": report.key.protection, "key_file": report.key.key_file,
                "same_filesystem": report.key.same_filesystem,
                "in_data_backup": report.key.in_data_backup,
                "warnings": list(report.key.warnings)},
        # last good backup, drill and next run per target (issue 14, backups)
        "backup": report.backup.as_dict(),
    }


def lines(report: StatusReport) -> list[str]:
    """``pacsvault status``."""
    out = [f"Vault        {report.data}  (AE title {report.ae_title})"]
    srv, conf = report.server, report.configured
    if report.server_alive:
        out.append(f"Server       running, pid {srv['pid']}; DICOM plain port "
                   f"{srv.get('dicom_port') or 'off'}, DICOM TLS port "
                   f"{srv.get('dicom_tls_port')}, HTTPS port {srv.get('https_port') or 'off'}")
        if report.sealed:  # the key is back here, but nobody has unsealed yet
            out.append(f"Server       {SEALED_ADVICE}")
    else:
        out.append(f"Server       not running (configured: plain {conf.dicom_port or 'off'}, "
                   f"TLS {conf.dicom_tls_port}, HTTPS {conf.https_port or 'off'} on "
                   f"{conf.bind})")
    out.append(f"Nodes        {len(report.nodes)}")
    for n in report.nodes:
        flags = ",".join(n.roles) + (" tls" if n.tls else "") + (
            " client-cert" if n.client_cert else "")
        out.append(f"  {n.ae_title:<16} {n.host}{':' + str(n.port) if n.port else ''}"
                   f"  {flags}")
    c = report.counts
    out.append(f"Contents     {c.patients} patients, {c.studies} studies, "
               f"{c.series} series, {c.instances} instances")
    s = report.storage
    out.append(f"Storage      {size(s.encrypted or 0)} encrypted ({size(s.received)} received)")
    server = report.certificate("server")
    until = (server.expires.isoformat(timespec="seconds")
             if server is not None and server.expires else "unreadable")
    out.append(f"Certificate  server certificate valid until {until}")
    if report.ca_name_constraints is False:
        # Made before issue 11: the CA installed on the practice PCs could vouch for any
        # name if its key were stolen (see ARCHITECTURE.md, TLS).
        out.append("Warning      CA without name constraints (vault made before they "
                   "existed): it can sign certificates for any name")
    for n in report.legacy_tls_nodes:
        out.append(f"Warning      node {n.ae_title} may use the retired AES TLS profile "
                   f"(TLS_RSA_WITH_AES_128_CBC_SHA, no forward secrecy) from {n.host}")
    out.append(f"Master key   {report.key.protection}, {report.key.key_file}")
    out.extend(f"Warning      {warning}" for warning in report.key.warnings)
    out.extend(backup_lines(report.backup))
    return out


def sealed_json(data: str, state: dict[str, Any], reason: str) -> dict[str, Any]:
    """``status --json`` while the server runs sealed and this command has no key either."""
    return {"data": data, "server": {"running": True, **state}, "sealed": True,
            "key": reason}


def sealed_lines(data: str, state: dict[str, Any], reason: str) -> list[str]:
    """``status`` then: the server (what the IT provider asks first), not an error about
    the key file."""
    return [
        f"Vault        {data}",
        f"Server       running, pid {state['pid']}; DICOM plain port "
        f"{state.get('dicom_port') or 'off'}, DICOM TLS port "
        f"{state.get('dicom_tls_port') or 'off'}, HTTPS port {state.get('https_port') or 'off'}",
        f"Server       {SEALED_ADVICE}",
        f"Master key   {reason}",
    ]
