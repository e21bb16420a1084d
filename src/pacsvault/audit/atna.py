"""Audit events as DICOM audit messages (PS3.15 A.5.1 XML), the payload IHE ATNA collectors read.

An audit record repository (the practice's or a regional one) understands one format: the
``AuditMessage`` XML of DICOM PS3.15 A.5.1 (the successor of RFC 3881). This module maps an
``AuditEvent`` onto it, following the schema's rules (A.5.1.1, Relax NG):

- ``EventIdentification``: ``EventID`` (DCM code of ``EventCode``), ``EventActionCode``
  (C/R/U/D/E), ``EventDateTime`` (xsd:dateTime *with* time zone, A.5.2.5: always UTC here),
  ``EventOutcomeIndicator`` (0/4/8/12). pacsvault's own action name travels as an
  ``EventTypeCode`` in the implementation-defined code system ``pacsvault``, and the event's
  message and detail as ``EventOutcomeDescription``, so a collector can tell a C-MOVE from a
  C-GET without a second lookup.
- ``ActiveParticipant`` (one or more): the person (``actor_user``) and/or the remote node
  (``actor_ae``, ``AlternativeUserID = "AETITLES=<ae>"`` as A.5.2.2 asks), with the source
  address as ``NetworkAccessPointID``; and always this archive itself, identified by its
  AE title.
- ``AuditSourceIdentification``: who reports (the archive), source type 4 "application
  server".
- ``ParticipantObjectIdentification``: each study (type 2 system object, role 3 report,
  ID type (110180, DCM, "Study Instance UID")) and each patient (type 1 person, role 1
  patient, ID type (2, RFC-3881, "Patient Number")).

Coded values use the current schema's attribute names: ``csd-code``, ``codeSystemName`` and
the mandatory ``originalText`` (the code meaning); ``displayName`` is optional.

The schema text of A.5.1.1 lists ``ParticipantObjectName | ParticipantObjectQuery`` without
a ``?``, but the message tables of A.5.3 make both "U" (user optional) for studies and
patients, and RFC 3881's XSD has them ``minOccurs="0"``; collectors follow the tables. We
never put a name there: the archive does not export patient names.

The XML names patients and studies: that is the point of ATNA (who saw whose images). It
therefore never goes to a log; ``SyslogSink`` sends it only over TLS and keeps it only
encrypted on disk.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import socket
import xml.etree.ElementTree as ET
from collections.abc import Mapping

from pacsvault.audit.events import AuditEvent, EventCode, Outcome

# Code meanings of the DCM event IDs (PS3.16 CID 400 "Audit Event ID").
EVENT_NAMES: Mapping[EventCode, str] = {
    EventCode.APPLICATION_ACTIVITY: "Application Activity",
    EventCode.BEGIN_TRANSFERRING: "Begin Transferring DICOM Instances",
    EventCode.INSTANCES_ACCESSED: "DICOM Instances Accessed",
    EventCode.INSTANCES_TRANSFERRED: "DICOM Instances Transferred",
    EventCode.EXPORT: "Export",
    EventCode.IMPORT: "Import",
    EventCode.NETWORK_ENTRY: "Network Entry",
    EventCode.QUERY: "Query",
    EventCode.SECURITY_ALERT: "Security Alert",
    EventCode.USER_AUTHENTICATION: "User Authentication",
}

# EventActionCode per event ID, as the A.5.3 message tables constrain it: Begin
# Transferring, Network Entry, Query, Security Alert, User Authentication and Application
# Activity are "E"; Export and Accessed are reads of what we hold; Import creates.
# Instances Transferred depends on the direction, see ``_action_code``.
_ACTION_CODES: Mapping[EventCode, str] = {
    EventCode.APPLICATION_ACTIVITY: "E",
    EventCode.BEGIN_TRANSFERRING: "E",
    EventCode.INSTANCES_ACCESSED: "R",
    EventCode.INSTANCES_TRANSFERRED: "R",
    EventCode.EXPORT: "R",
    EventCode.IMPORT: "C",
    EventCode.NETWORK_ENTRY: "E",
    EventCode.QUERY: "E",
    EventCode.SECURITY_ALERT: "E",
    EventCode.USER_AUTHENTICATION: "E",
}

# PS3.16 CID 402 "Audit Active Participant Role ID".
_ROLE_APPLICATION = ("110150", "Application")
_ROLE_LAUNCHER = ("110151", "Application Launcher")
_ROLE_DESTINATION = ("110152", "Destination Role ID")
_ROLE_SOURCE = ("110153", "Source Role ID")

_STUDY_ID_TYPE = ("110180", "DCM", "Study Instance UID")
_PATIENT_ID_TYPE = ("2", "RFC-3881", "Patient Number")
_SOURCE_TYPE_APPLICATION_SERVER = "4"
_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>'

# XML 1.0 forbids most control characters even escaped; a calling AE title is chosen by
# whoever connects, so anything outside the allowed ranges is replaced, never trusted.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _clean(text: str) -> str:
    return _NOT_XML.sub("\ufffd", text)


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    return True


def event_datetime(when: dt.datetime) -> str:
    """xsd:dateTime in UTC with an explicit zone (A.5.2.5 requires the zone)."""
    if when.tzinfo is None:  # the event model makes aware times; be safe with others
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _participant(object_id: str, type_code: str, role: str,
                 id_type: tuple[str, str, str]) -> ET.Element:
    """A ParticipantObjectIdentification (RFC 3881 / DICOM PS3.15 A.5): the object's id,
    its type and role codes, and what kind of id it is."""
    element = ET.Element("ParticipantObjectIdentification", {
        "ParticipantObjectID": _clean(object_id),
        "ParticipantObjectTypeCode": type_code,
        "ParticipantObjectTypeCodeRole": role,
    })
    _coded(element, "ParticipantObjectIDTypeCode", *id_type)
    return element


def _coded(parent: ET.Element, tag: str, code: str, system: str, meaning: str) -> ET.Element:
    return ET.SubElement(
        parent, tag,
        {"csd-code": _clean(code), "codeSystemName": system, "originalText": _clean(meaning)},
    )


def _is_inbound(event: AuditEvent) -> bool:
    """True when the remote actor sent instances to us (C-STORE), not the other way round."""
    return ".store" in f".{event.action}"


class AuditMessageBuilder:
    """Turns ``AuditEvent`` into PS3.15 A.5.1 ``AuditMessage`` XML for one archive.

    ``archive_ae`` names this archive as an active participant (the DICOM application that
    did the work); ``source_id`` is the ``AuditSourceID`` (default: the AE title), which
    the collector uses to tell reporting systems apart; ``hostname`` is the archive's
    network access point (default: this machine's name); ``site_id`` is the optional
    ``AuditEnterpriseSiteID`` (e.g. the practice's name).
    """

    def __init__(
        self,
        archive_ae: str,
        *,
        source_id: str | None = None,
        hostname: str | None = None,
        site_id: str | None = None,
    ) -> None:
        self.archive_ae = archive_ae.strip()
        self.source_id = (source_id or "").strip() or self.archive_ae
        self.hostname = (hostname or "").strip() or socket.gethostname()
        self.site_id = (site_id or "").strip()

    # --- pieces ----------------------------------------------------------------------

    def _action_code(self, event: AuditEvent) -> str:
        if event.code is EventCode.INSTANCES_TRANSFERRED and _is_inbound(event):
            return "C"  # we received (created) them: A.5.3.5 "C = create"
        if event.code is EventCode.INSTANCES_ACCESSED and event.action == "patient.erased":
            return "D"  # a patient's erasure (storage.erasure): delete, A.5.3.3
        if event.code is EventCode.INSTANCES_ACCESSED and event.action.startswith("object."):
            # an admin's removal (D = delete) or quarantine change (U = update), A.5.3.3
            return "D" if event.action == "object.deleted" else "U"
        return _ACTION_CODES.get(event.code, "E")

    def _roles(self, event: AuditEvent) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
        """(remote actor's role, archive's role) where A.5.3 defines them."""
        if event.code in (EventCode.INSTANCES_TRANSFERRED, EventCode.BEGIN_TRANSFERRING):
            if _is_inbound(event):
                return _ROLE_SOURCE, _ROLE_DESTINATION
            return _ROLE_DESTINATION, _ROLE_SOURCE
        if event.code is EventCode.APPLICATION_ACTIVITY:
            return _ROLE_LAUNCHER, _ROLE_APPLICATION
        if event.code is EventCode.EXPORT:
            return None, _ROLE_SOURCE
        if event.code is EventCode.IMPORT:
            return None, _ROLE_DESTINATION
        return None, None

    def _event_identification(
        self, root: ET.Element, event: AuditEvent, part: tuple[int, int] | None
    ) -> None:
        ident = ET.SubElement(root, "EventIdentification", {
            "EventActionCode": self._action_code(event),
            "EventDateTime": event_datetime(event.time),
            "EventOutcomeIndicator": event.outcome.value,
        })
        _coded(ident, "EventID", event.code.value, "DCM",
               EVENT_NAMES.get(event.code, event.code.name.replace("_", " ").title()))
        if event.action:
            _coded(ident, "EventTypeCode", event.action, "pacsvault", event.action)
        description = _describe(event)
        if part is not None:
            description = f"{description} (part {part[0]} of {part[1]})".strip()
        if description:
            ET.SubElement(ident, "EventOutcomeDescription").text = _clean(description)

    def _participant(
        self, root: ET.Element, user_id: str, *, requestor: bool, ae: str = "",
        address: str = "", user_name: str = "", role: tuple[str, str] | None = None,
    ) -> None:
        attrs = {"UserID": _clean(user_id)}
        if ae:
            attrs["AlternativeUserID"] = _clean(f"AETITLES={ae}")
        if user_name:
            attrs["UserName"] = _clean(user_name)
        attrs["UserIsRequestor"] = "true" if requestor else "false"
        if address:
            attrs["NetworkAccessPointID"] = _clean(address)
            attrs["NetworkAccessPointTypeCode"] = "2" if _is_ip(address) else "1"
        participant = ET.SubElement(root, "ActiveParticipant", attrs)
        if role is not None:
            _coded(participant, "RoleIDCode", role[0], "DCM", role[1])

    def _participants(self, root: ET.Element, event: AuditEvent) -> None:
        remote_role, archive_role = self._roles(event)
        has_actor = bool(event.actor_user or event.actor_ae or event.actor_address)
        destination = ""
        if remote_role == _ROLE_DESTINATION:
            # C-MOVE: the requester is not necessarily where the images went.
            destination = str(event.detail.get("destination", "")).strip()
            if destination and destination != event.actor_ae:
                remote_role = None
            else:
                destination = ""
        if event.actor_user:
            # A person (web or CLI user); if a node is also known it is a second
            # participant, as A.5.3 asks ("both the person and the process").
            self._participant(root, event.actor_user, requestor=True,
                              address=event.actor_address, role=remote_role)
        if event.actor_ae or (event.actor_address and not event.actor_user):
            # A remote DICOM node; an unidentified peer (refused before A-ASSOCIATE) is
            # still a participant, known only by its address.
            self._participant(
                root, event.actor_ae or event.actor_address,
                requestor=not event.actor_user, ae=event.actor_ae,
                address=event.actor_address,
                role=remote_role if not event.actor_user else None,
            )
        if destination:
            self._participant(root, destination, requestor=False, ae=destination,
                              role=_ROLE_DESTINATION)
        self._participant(
            root, self.archive_ae, requestor=not has_actor, ae=self.archive_ae,
            address=self.hostname, user_name="pacsvault", role=archive_role,
        )

    def _source(self, root: ET.Element) -> None:
        attrs = {"AuditSourceID": _clean(self.source_id)}
        if self.site_id:
            attrs = {"AuditEnterpriseSiteID": _clean(self.site_id), **attrs}
        source = ET.SubElement(root, "AuditSourceIdentification", attrs)
        ET.SubElement(source, "AuditSourceTypeCode",
                      {"csd-code": _SOURCE_TYPE_APPLICATION_SERVER})

    def participant_objects(self, event: AuditEvent) -> list[ET.Element]:
        """One ParticipantObjectIdentification per study, then one per patient."""
        found: list[ET.Element] = []
        for uid in dict.fromkeys(event.study_uids):
            study = _participant(uid, "2", "3", _STUDY_ID_TYPE)  # system object, report
            if event.sop_uids and len(event.study_uids) == 1:
                # Instances can only be attributed to a study when there is one.
                description = ET.SubElement(study, "ParticipantObjectDescription")
                sop_class = ET.SubElement(description, "SOPClass",
                                          {"NumberOfInstances": str(len(event.sop_uids))})
                for sop in dict.fromkeys(event.sop_uids):
                    ET.SubElement(sop_class, "Instance", {"UID": _clean(sop)})
            found.append(study)
        for patient_id in dict.fromkeys(event.patient_ids):
            found.append(_participant(patient_id, "1", "1", _PATIENT_ID_TYPE))  # person, patient
        return found

    # --- the message -----------------------------------------------------------------

    def build(
        self,
        event: AuditEvent,
        objects: list[ET.Element] | None = None,
        part: tuple[int, int] | None = None,
    ) -> ET.Element:
        """The ``AuditMessage`` element, children in the order the schema requires.

        ``objects`` replaces the event's participant objects (one part of a split
        message), ``part`` = (i, n) marks it in the description.
        """
        root = ET.Element("AuditMessage")
        self._event_identification(root, event, part)
        self._participants(root, event)
        self._source(root)
        root.extend(self.participant_objects(event) if objects is None else objects)
        return root

    def to_bytes(self, event: AuditEvent) -> bytes:
        """UTF-8 XML document (with declaration), on one line: no pretty-printing, so the
        syslog record carries no newline a line-oriented collector could split on."""
        return _serialize(self.build(event))

    def documents(self, event: AuditEvent, max_bytes: int) -> list[bytes]:
        """The event as one or more documents of at most ``max_bytes`` each (if possible).

        A collector may refuse or truncate large syslog records (RFC 5425 only obliges it
        to take 2 KiB, and asks for 8 KiB), and an export of a whole archive names
        thousands of studies. Such an event becomes several complete AuditMessages with
        the same event, participants and source, each naming a share of the objects and
        marked "part i of n", as A.5.3 allows ("the message may be repeated"). An object
        too big on its own loses its optional Instance list (NumberOfInstances stays).
        """
        objects = self.participant_objects(event)
        whole = _serialize(self.build(event, objects))
        if len(whole) <= max_bytes or not objects:
            return [whole]
        budget = max_bytes - len(_serialize(self.build(event, [], part=(99_999, 99_999))))
        sized: list[tuple[ET.Element, int]] = []
        for obj in objects:
            size = len(_serialize_part(obj))
            if size > budget:
                for sop_class in obj.iter("SOPClass"):
                    for instance in list(sop_class):
                        sop_class.remove(instance)
                size = len(_serialize_part(obj))
            sized.append((obj, size))
        chunks: list[list[ET.Element]] = [[]]
        used = 0
        for obj, size in sized:
            if chunks[-1] and used + size > budget:
                chunks.append([])
                used = 0
            chunks[-1].append(obj)
            used += size
        total = len(chunks)
        return [_serialize(self.build(event, chunk, part=(i, total)))
                for i, chunk in enumerate(chunks, start=1)]


def _serialize(root: ET.Element) -> bytes:
    return _DECLARATION + ET.tostring(root, encoding="unicode").encode("utf-8")


def _serialize_part(element: ET.Element) -> bytes:
    return ET.tostring(element, encoding="unicode").encode("utf-8")


def _describe(event: AuditEvent) -> str:
    """Free text for EventOutcomeDescription: message plus detail, no object references."""
    parts = [event.message.strip()] if event.message.strip() else []
    if event.detail:
        parts.append("; ".join(f"{k}={v}" for k, v in event.detail.items()))
    # One line: a line-oriented collector or viewer must not split the record.
    return " ".join(" | ".join(parts).split())


def severity(outcome: Outcome) -> int:
    """RFC 5424 severity for an outcome: ITI-20 asks for 5 (notice) or 4 (warning)."""
    return 5 if outcome is Outcome.SUCCESS else 4
