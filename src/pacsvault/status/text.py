"""The status report as ``pacsvault status`` prints it: text lines and the ``--json`` form.

The text is for the IT provider at a terminal (a label column, one fact per line, every
warning on its own ``Warning`` line); the JSON keeps the keys scripts already read. The
Health page renders the same ``StatusReport`` with its template (``web/admin_health``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pacsvault.backup.health import status_lines as backup_lines
from pacsvault.status.deployment import STALE_CHECKPOINTS, Deployment
from pacsvault.status.report import StatusReport

# A scale-out vault without a backup target (issue 16: 'pacsvault backup' streams a
# pg_dump of a PostgreSQL index and copies the bucket's objects into its snapshots).
SCALE_OUT_BACKUP = ("no backup target configured: add [[backup.targets]] and run "
                    "'pacsvault backup init' (the backups take the PostgreSQL index as a "
                    "pg_dump and the bucket's objects); until then only the database's own "
                    "backups and the bucket's versioning or replication protect the data, "
                    "and pacsvault cannot check either")
BUCKET_BACKUP = ("the objects are in an S3 bucket and no backup target is configured: "
                 "only the bucket's versioning or replication protects them, and pacsvault "
                 "cannot check it")
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
        "backup": _backup_json(report),
        # index and object backends, instances (issue 16)
        **({"deployment": report.deployment.as_dict()} if report.deployment else {}),
    }


def _backup_json(report: StatusReport) -> dict[str, Any]:
    found = report.backup.as_dict()
    deployed = report.deployment
    if deployed is not None and deployed.scale_out and not report.backup.configured:
        found["warning"] = SCALE_OUT_BACKUP
    if deployed is not None and deployed.objects.kind == "s3" and not deployed.scale_out \
            and not report.backup.configured:
        found["objects_warning"] = BUCKET_BACKUP
    return found


def _when(value: str | dt.datetime | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        try:
            return _when(dt.datetime.fromisoformat(value))
        except ValueError:
            return value
    return value.astimezone().strftime("%Y-%m-%d %H:%M")


def deployment_lines(deployed: Deployment) -> list[str]:
    """Index, objects, scrub and sweep, instances: a red line (ERROR) for what does not
    answer or was found lost; a Warning for a weak TLS mode or a silent instance."""
    out: list[str] = []
    ix = deployed.index
    if ix.reachable:
        out.append(f"Index        {ix.describe}; schema revision {ix.revision or 'none'}"
                   + ("" if ix.revision == ix.head else f" (this code: {ix.head})"))
    elif ix.error.startswith("the PostgreSQL"):  # the vault's open refused: its reason
        out.append(f"Index        ERROR {ix.describe}: {ix.error}")
    else:
        out.append(f"Index        ERROR {ix.describe}: UNREACHABLE ({ix.error})")
    if ix.weakness:
        out.append(f"Warning      {ix.weakness}")
    ob = deployed.objects
    if ob.reachable is False:
        out.append(f"Objects      ERROR {ob.describe}: UNREACHABLE ({ob.error})")
    else:
        out.append(f"Objects      {ob.describe}"
                   + ("; reachable" if ob.kind == "s3" and ob.reachable else ""))
    sc = ob.scrub
    if sc:
        found = (f"{sc.get('missing', 0)} missing, {sc.get('corrupt', 0)} corrupt: restore "
                 "them from a backup ('pacsvault storage scrub' lists them)"
                 if ob.scrub_bad else "all present and intact")
        out.append(f"Scrub        {'ERROR ' if ob.scrub_bad else ''}last "
                   f"{'pass' if sc.get('complete', True) else 'partial pass'} "
                   f"{_when(sc.get('time'))} ({sc.get('via', '?')}): "
                   f"{sc.get('checked', 0)} objects read; {found}")
    elif ob.kind == "s3":
        out.append("Scrub        no pass recorded yet (serve scrubs in the background; "
                   "'pacsvault storage scrub' runs one now)")
    sw = ob.sweep
    if sw:
        out.append(f"Sweep        {'ERROR ' if ob.sweep_refused else ''}last orphan sweep "
                   f"{_when(sw.get('time'))}: {sw.get('listed', 0)} objects listed, "
                   f"{sw.get('removed', 0)} orphans removed"
                   + (f", {sw['refused']} orphans REFUSED (more than orphan_limit: is "
                      "this the index that goes with this bucket?)"
                      if ob.sweep_refused else ""))
    elif ob.kind == "s3":
        out.append("Sweep        no orphan sweep recorded yet")
    if deployed.instances:
        out.append(f"Instances    {len(deployed.instances)} sharing the index "
                   f"(this one: {deployed.instance}; checkpoint every "
                   f"{deployed.checkpoint_seconds} s)")
    for inst in deployed.instances:
        last = (f"last checkpoint {_when(inst.last_checkpoint)} ({inst.reason})"
                if inst.last_checkpoint else "no checkpoint yet (never served)")
        out.append(f"  {inst.name:<16} {'this ' if inst.this else ''}record {inst.seq}; "
                   f"{last}")
        if inst.silent:
            out.append(f"Warning      instance {inst.name} has not checkpointed since "
                       f"{_when(inst.last_checkpoint)} (more than {STALE_CHECKPOINTS} x "
                       f"{deployed.checkpoint_seconds} s) and did not stop cleanly: is it "
                       "still running?")
    return out


def lines(report: StatusReport) -> list[str]:
    """``pacsvault status``."""
    out = [f"Vault        {report.data}  (AE title {report.ae_title})"]
    srv, conf = report.server, report.configured
    if report.server_alive:
        out.append(f"Server       running, pid {srv['pid']}; DICOM plain port "
                   f"{srv.get('dicom_port') or 'off'}, DICOM TLS port "
                   f"{srv.get('dicom_tls_port')}, HTTPS port {srv.get('https_port') or 'off'}")
        if srv.get("addresses"):  # bind = "private": each address listened on (issue 19)
            out.append(f"Listening on {', '.join(str(a) for a in srv['addresses'])} "
                       f"({srv.get('bind')})")
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
    if report.deployment is not None:
        out.extend(deployment_lines(report.deployment))
    c = report.counts
    out.append(f"Contents     {c.patients} patients, {c.studies} studies, "
               f"{c.series} series, {c.instances} instances")
    s = report.storage
    if s.encrypted is None and report.deployment is not None \
            and report.deployment.objects.kind == "s3":
        out.append(f"Storage      {size(s.received)} received; the encrypted objects are in "
                   "the bucket (not measured here)")
    else:
        out.append(f"Storage      {size(s.encrypted or 0)} encrypted ({size(s.received)} "
                   "received)")
    server = report.certificate("server")
    until = (server.expires.isoformat(timespec="seconds")
             if server is not None and server.expires else "unreadable")
    out.append(f"Certificate  server certificate valid until {until}")
    if report.ca_name_constraints is False:
        # Made before issue 11: the CA installed on the practice PCs could vouch for any
        # name if its key were stolen (see docs/data-directory.md, tls/).
        out.append("Warning      CA without name constraints (vault made before they "
                   "existed): it can sign certificates for any name")
    for n in report.legacy_tls_nodes:
        out.append(f"Warning      node {n.ae_title} may use the retired AES TLS profile "
                   f"(TLS_RSA_WITH_AES_128_CBC_SHA, no forward secrecy) from {n.host}")
    out.append(f"Master key   {report.key.protection}, {report.key.key_file}")
    out.extend(f"Warning      {warning}" for warning in report.key.warnings)
    deployed = report.deployment
    if deployed is not None and deployed.scale_out and not report.backup.configured:
        out.append(f"Backup       WARNING {SCALE_OUT_BACKUP}")
    else:
        out.extend(backup_lines(report.backup))
    if deployed is not None and deployed.objects.kind == "s3" and not deployed.scale_out \
            and not report.backup.configured:
        out.append(f"Backup       WARNING {BUCKET_BACKUP}")
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


def unopened_json(data: str, state: dict[str, Any], alive: bool,
                  deployed: Deployment) -> dict[str, Any]:
    """``status --json`` when the index cannot be opened (a PostgreSQL down): what is known
    without it."""
    return {"data": data, "server": {"running": True, **state} if alive else {"running": False},
            "deployment": deployed.as_dict()}


def unopened_lines(data: str, state: dict[str, Any], alive: bool,
                   deployed: Deployment) -> list[str]:
    """``status`` then: the server, the index's red line, the objects; nothing that needs
    the index (counts, nodes, accounts)."""
    out = [f"Vault        {data}"]
    if alive:
        out.append(f"Server       running, pid {state.get('pid')}")
    else:
        out.append("Server       not running")
    out.extend(deployment_lines(deployed))
    return out
