"""What every DICOMweb route shares: the vault, the base URL of links, the audit record,
JSON and multipart answers, the JSON Accept check, and the answer to a failed retrieval.

Split from ``web/dicomweb`` (issue 15), which keeps the routes, QIDO-RS and STOW-RS;
WADO-RS is in ``web/wado_handlers``. Errors are ``web/errors``' one type and table.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.vault import Vault
from pacsvault.web import errors, wado
from pacsvault.web.multipart import closing, new_boundary, parse_accept, part_header
from pacsvault.web.principal import Principal

log = logging.getLogger("pacsvault.web.dicomweb")

DICOM_JSON = "application/dicom+json"

# ``qido.QidoError`` and ``wado.WadoError`` are ``errors.DicomWebError``s: one table.
RULES: tuple[errors.Rule, ...] = errors.RULES


def vault_of(request: Request) -> Vault:
    vault: Vault = request.app.state.vault
    return vault


_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]+)?$")


def base_url(request: Request) -> str:
    """Absolute URL of /dicom-web for links in answers.

    The host name comes from the Host header (what the client used to reach us), the port
    from the listening socket: some clients (dicomweb-client) send Host without the port.
    """
    server = request.scope.get("server") or ("localhost", 443)
    host_header = request.headers.get("host", "")
    match = _HOST.match(host_header)
    host = match.group(1) if match else str(server[0])
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = int(server[1]) if server[1] else 443
    authority = host if port == 443 else f"{host}:{port}"
    return f"https://{authority}/dicom-web"


def event_of(
    who: Principal, action: str, code: EventCode, outcome: Outcome, *,
    message: str = "", detail: dict[str, str | int | bool] | None = None,
    study_uids: tuple[str, ...] = (), sop_uids: tuple[str, ...] = (),
    patient_ids: tuple[str, ...] = (), study_patients: Mapping[str, str] | None = None,
    sop_studies: Mapping[str, str] | None = None,
) -> AuditEvent:
    """A DICOMweb request's record. ``study_patients``/``sop_studies``: whose each study
    is and which study each instance is in, when the answer already said so: the trail
    then groups the references without asking the index again (issue 17)."""
    detail = dict(detail or {})
    if who.token_id:
        detail["token"] = who.token_id  # its id, never the secret (breach scope)
    if who.share:
        detail["share"] = who.share  # a share session's reads: the share, not a person
    return AuditEvent(
        action=action, outcome=outcome, code=code, message=message,
        actor_user=who.user, actor_address=who.address, study_uids=study_uids,
        sop_uids=sop_uids, patient_ids=patient_ids, detail=detail,
        study_patients=dict(study_patients or {}), sop_studies=dict(sop_studies or {}),
    )


async def record(
    request: Request, who: Principal, action: str, code: EventCode, outcome: Outcome, *,
    message: str = "", detail: dict[str, str | int | bool] | None = None,
    study_uids: tuple[str, ...] = (), sop_uids: tuple[str, ...] = (),
    patient_ids: tuple[str, ...] = (), study_patients: Mapping[str, str] | None = None,
    sop_studies: Mapping[str, str] | None = None,
) -> None:
    event = event_of(who, action, code, outcome, message=message, detail=detail,
                     study_uids=study_uids, sop_uids=sop_uids, patient_ids=patient_ids,
                     study_patients=study_patients, sop_studies=sop_studies)
    await run_in_threadpool(vault_of(request).recorder.emit, event)


def json_answer(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Response(body, status_code=status, media_type=DICOM_JSON, headers=headers)


def accepts_json(request: Request) -> bool:
    return any(r.matches(DICOM_JSON) or r.matches("application/json")
               for r in parse_accept(request.headers.get("accept")))


def multipart_answer(parts: list[tuple[str, bytes]], part_type: str) -> Response:
    boundary = new_boundary()
    chunks: list[bytes] = []
    for content_type, data in parts:
        chunks += [part_header(boundary, content_type, len(data)), data, b"\r\n"]
    chunks.append(closing(boundary))
    return Response(b"".join(chunks),
                    media_type=f'multipart/related; type="{part_type}"; boundary={boundary}')


async def retrieve_failed(request: Request, who: Principal, resource: str,
                          exc: Exception) -> Response:
    """Answer and record a failed WADO request (``errors.failure``: unexpected errors are
    logged by type only, their messages may quote values from a dataset)."""
    failed = errors.failure(exc, log, f"WADO-RS {resource}", RULES)
    outcome = Outcome.SERIOUS_FAILURE if failed.serious else Outcome.MINOR_FAILURE
    await record(request, who, "dicomweb.retrieve", EventCode.INSTANCES_ACCESSED, outcome,
                 message=failed.message, detail={"resource": resource, "status": failed.status})
    return failed.response()


async def accessed(
    request: Request, who: Principal, resource: str, items: list[wado.Located], *,
    instance_level: bool,
) -> None:
    await record(
        request, who, "dicomweb.retrieve", EventCode.INSTANCES_ACCESSED, Outcome.SUCCESS,
        detail={"resource": resource, "instances": len(items)},
        study_uids=wado.studies_of(items),
        sop_uids=tuple(i.sop_uid for i in items) if instance_level else (),
        study_patients={i.study_uid: i.patient_id for i in items if i.patient_id},
        sop_studies={i.sop_uid: i.study_uid for i in items} if instance_level else None,
    )
