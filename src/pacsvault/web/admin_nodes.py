"""The DICOM devices page: ``/admin/nodes``, the web face of ``pacsvault node add|set|remove``.

Same registry (``index.nodes.NodeRegistry``), same rules and the same audit events
(``node.add``, ``node.set``, ``node.remove``, Security Alert) as the command line, with the
admin's user name and address as actor. The DICOM listener asks the registry at every
association (``dicom.policy.AssociationPolicy``, no cache), so a device added here may send
at once.

Each field is checked here first so that the page can say, next to the field and in the
page's language, what is wrong; the registry checks again. AE titles travel in form fields
and in the edit page's query string (never in a path: they may contain ``/``); they are
not patient data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Form, HTTPException, Request
from sqlalchemy import select
from starlette.responses import Response

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.index import hosts
from pacsvault.index.models import Node
from pacsvault.index.nodes import ROLES, NodeError, NodeInfo, NodeRegistry
from pacsvault.web import node_bundle
from pacsvault.web.deps import client_address
from pacsvault.web.i18n import N_, Gettext, gettext
from pacsvault.web.kit import AdminPage, page, redirect, vault_of
from pacsvault.web.principal import Principal

router = APIRouter()

Field = Annotated[str, Form(max_length=256)]
NODES = "/admin/nodes"
ROLE_NAMES = {"store": N_("send images (store)"), "query": N_("search (query)"),
              "retrieve": N_("retrieve images (retrieve)")}
_AE_CHARS = re.compile(r"^[ -~]+$")
# hosts.check_host's refusals, in the page's words (same rules as the command line).
HOST_ERRORS = {
    "host-empty": N_("Enter the device's IP address or host name."),
    "host-url": N_("Enter only the device's address or host name, without “http://” or a "
                   "path."),
    "host-network": N_("Enter the address of one device: networks (such as 192.168.1.0/24) "
                       "cannot be registered."),
    "host-space": N_("A host name has no spaces: enter the device's IP address or host "
                     "name, not its description."),
    "host-bad-ip": N_("This is not a valid IP address: four numbers from 0 to 255, such as "
                      "192.168.1.20."),
    "host-not-device": N_("This is not the address of one device."),
    "host-public": N_("This is a public internet address: plain DICOM is for the practice "
                      "network. Tick “Must use DICOM TLS” for a device outside it."),
}
NOTICES = {"added": N_("The device {ae} was registered: it may send now."),
           "saved": N_("The device {ae} was saved."),
           "removed": N_("The device {ae} was removed: it can no longer connect.")}


@dataclass
class NodeForm:
    ae_title: str = ""
    host: str = ""
    port: str = ""
    tls: bool = False
    client_cert: bool = False
    roles: list[str] = field(default_factory=lambda: ["store"])
    errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, node: NodeInfo) -> NodeForm:
        return cls(node.ae_title, node.host, str(node.port or ""), node.tls, node.client_cert,
                   list(node.roles))

    def port_number(self) -> int | None:
        return int(self.port) if self.port else None


def _registry(request: Request) -> NodeRegistry:
    return vault_of(request).nodes


def check_form(form: NodeForm, _: Gettext, *, new: bool,
               registry: NodeRegistry | None = None) -> NodeForm:
    """Fill ``form.errors`` (field → translated sentence) and normalise the values."""
    form.ae_title = form.ae_title.strip()
    form.host = form.host.strip()
    form.port = form.port.strip()
    form.roles = [r for r in dict.fromkeys(form.roles) if r in ROLES]
    if form.client_cert:
        form.tls = True  # as the command line: a client certificate is a TLS thing
    if new:
        ae = form.ae_title
        if not ae:
            form.errors["ae_title"] = _("Enter the device's AE title.")
        elif len(ae) > 16:
            form.errors["ae_title"] = _("An AE title has at most 16 characters.")
        elif not _AE_CHARS.match(ae) or "\\" in ae:
            form.errors["ae_title"] = _("An AE title uses only letters, digits, spaces and "
                                        "punctuation (ASCII), without a backslash.")
        elif registry is not None and registry.get(ae) is not None:
            form.errors["ae_title"] = _("A device with the AE title {ae} is already "
                                        "registered.").format(ae=ae)
    try:
        form.host = hosts.check_host(form.host, tls=form.tls)
    except hosts.HostError as exc:
        form.errors["host"] = (_(HOST_ERRORS[exc.code]) if exc.code in HOST_ERRORS else
                               _("Enter an IP address (such as 192.168.1.20) or a host "
                                 "name (such as echo.cabinet.local)."))
    if form.port:
        if not form.port.isdigit() or not 0 < int(form.port) < 65536:
            form.errors["port"] = _("The port is a number from 1 to 65535.")
    elif "retrieve" in form.roles:
        form.errors["port"] = _("A workstation that retrieves images needs its own DICOM "
                                "port: pacsvault sends the images there.")
    if not form.roles:
        form.errors["roles"] = _("Choose at least one role.")
    return form


def _event(request: Request, principal: Principal, action: str, ae_title: str,
           **detail: str | bool) -> None:
    vault_of(request).recorder.emit(AuditEvent(
        action=action, outcome=Outcome.SUCCESS, code=EventCode.SECURITY_ALERT,
        actor_user=principal.user, actor_address=client_address(request),
        detail={"node": ae_title, **detail, "via": "web"},
    ))


def _nodes_page(request: Request, form: NodeForm | None = None, status: int = 200,
                message: str = "", message_kind: str = "error") -> Response:
    return page(request, "admin_nodes.html", status, nodes=_registry(request).all(),
                form=form or NodeForm(), roles=ROLES, node_roles=ROLE_NAMES,
                field_errors=(form.errors if form else {}), message=message,
                message_kind=message_kind, nav="admin", admin_nav="nodes",
                our_ae=vault_of(request).settings.server.ae_title)


def _edit_page(request: Request, form: NodeForm, status: int = 200,
               message: str = "", message_kind: str = "error") -> Response:
    return page(request, "admin_node_edit.html", status, form=form, roles=ROLES,
                node_roles=ROLE_NAMES, field_errors=form.errors, message=message,
                message_kind=message_kind, nav="admin", admin_nav="nodes",
                bundle_pending=node_bundle.pending(vault_of(request), form.ae_title))


def _form(ae_title: str, host: str, port: str, tls: str, client_cert: str,
          roles: list[str] | None) -> NodeForm:
    return NodeForm(ae_title, host, port, bool(tls), bool(client_cert), list(roles or []))


@router.get(NODES)
def nodes_page(request: Request, principal: AdminPage, notice: str = "",
               ae: str = "") -> Response:
    text = ""
    # Only a notice that matches the registry (a crafted link cannot announce anything).
    exists = bool(ae.strip()) and _registry(request).get(ae) is not None
    if notice in NOTICES and exists == (notice != "removed") and ae.strip():
        text = gettext(request)(NOTICES[notice]).format(ae=ae.strip())
    return _nodes_page(request, message=text, message_kind="ok")


@router.post(NODES)
def add_node(request: Request, principal: AdminPage, ae_title: Field = "", host: Field = "",
             port: Field = "", tls: Field = "", client_cert: Field = "",
             roles: Annotated[list[str] | None, Form()] = None) -> Response:
    _ = gettext(request)
    registry = _registry(request)
    form = check_form(_form(ae_title, host, port, tls, client_cert, roles), _, new=True,
                      registry=registry)
    if form.errors:
        return _nodes_page(request, form, 400, _("The device was not registered: see the "
                                                 "fields marked below."))
    try:
        info = registry.add(form.ae_title, form.host, form.port_number(), tls=form.tls,
                            client_cert=form.client_cert, roles=tuple(form.roles))
    except NodeError:  # a race with the command line
        form.errors["ae_title"] = _("A device with the AE title {ae} is already "
                                    "registered.").format(ae=form.ae_title)
        return _nodes_page(request, form, 400, form.errors["ae_title"])
    _event(request, principal, "node.add", info.ae_title, roles=",".join(info.roles))
    return redirect(f"{NODES}?{_notice('added', info.ae_title)}")


def _notice(kind: str, ae_title: str) -> str:
    return urlencode({"notice": kind, "ae": ae_title})


@router.get(f"{NODES}/edit")
def edit_node_page(request: Request, principal: AdminPage, ae: str = "") -> Response:
    node = _registry(request).get(ae) if ae.strip() else None
    if node is None:
        raise HTTPException(404, "not found")
    return _edit_page(request, NodeForm.of(node))


@router.post(f"{NODES}/certificate")
def issue_bundle(request: Request, principal: AdminPage, ae_title: Field = "") -> Response:
    """Issue a TLS node's certificates; the keys wait, encrypted, for one download."""
    node = _registry(request).get(ae_title) if ae_title.strip() else None
    if node is None or not node.tls:
        raise HTTPException(404, "not found")
    issued = node_bundle.issue(vault_of(request), node)
    _event(request, principal, "node.cert", node.ae_title,
           serials=",".join(f"{c.serial:x}" for c in issued))
    _ = gettext(request)
    return _edit_page(request, NodeForm.of(node), message=_(
        "The certificates were issued. Download the bundle now: it holds the private keys "
        "and can be downloaded only once."), message_kind="ok")


@router.post(f"{NODES}/certificate/download")
def download_bundle(request: Request, principal: AdminPage, ae_title: Field = "") -> Response:
    node = _registry(request).get(ae_title) if ae_title.strip() else None
    if node is None:
        raise HTTPException(404, "not found")
    try:
        bundle = node_bundle.take(vault_of(request), node.ae_title)
    except node_bundle.BundleGone:
        _ = gettext(request)
        return _edit_page(request, NodeForm.of(node), 410, _(
            "This bundle was already downloaded (or has expired): its private key is no "
            "longer on the server. Issue new certificates to get another one."))
    _event(request, principal, "node.cert.download", node.ae_title,
           serials=",".join(bundle.serials))
    return Response(bundle.pem, media_type="application/x-pem-file", headers={
        "Content-Disposition": f'attachment; filename="{bundle.filename}"',
        "Cache-Control": "no-store"})


@router.post(f"{NODES}/edit")
def edit_node(request: Request, principal: AdminPage, ae_title: Field = "", host: Field = "",
              port: Field = "", tls: Field = "", client_cert: Field = "",
              roles: Annotated[list[str] | None, Form()] = None) -> Response:
    _ = gettext(request)
    registry = _registry(request)
    if not ae_title.strip() or registry.get(ae_title) is None:
        raise HTTPException(404, "not found")
    form = check_form(_form(ae_title, host, port, tls, client_cert, roles), _, new=False)
    if form.errors:
        return _edit_page(request, form, 400, _("Nothing was changed: see the fields marked "
                                                "below."))
    try:
        info = registry.update(form.ae_title, host=form.host, port=form.port_number(),
                               tls=form.tls, client_cert=form.client_cert,
                               roles=tuple(form.roles))
    except NodeError:
        raise HTTPException(404, "not found") from None
    if form.port_number() is None and info.port is not None:
        # The registry keeps a port it is not given; an emptied field means "no port".
        with vault_of(request).sessions.begin() as s:
            row = s.scalar(select(Node).where(Node.ae_title == info.ae_title))
            if row is not None:
                row.port = None
    _event(request, principal, "node.set", info.ae_title, roles=",".join(info.roles),
           tls=info.tls, client_cert=info.client_cert)
    return redirect(f"{NODES}?{_notice('saved', info.ae_title)}")


@router.post(f"{NODES}/remove")
def remove_node(request: Request, principal: AdminPage, ae_title: Field = "") -> Response:
    try:
        _registry(request).remove(ae_title)
    except NodeError:
        raise HTTPException(404, "not found") from None
    _event(request, principal, "node.remove", ae_title.strip())
    return redirect(f"{NODES}?{_notice('removed', ae_title.strip())}")
