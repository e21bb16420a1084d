"""One row per access for a reader: a viewing's many DICOMweb records made one.

A viewer opening a study makes dozens of requests (series search, metadata, one per frame
or rendered image), each recorded on its own, as it must be: the trail is evidence, and
every access is there. A DPO asking "who looked at this file?" wants one line per viewing
instead: "user X, from Y, viewed study S (N images), 09:14-09:22". This module groups the
records of one viewing, keeping them all behind the group (nothing is dropped: a group
is a view of the records, never a replacement).

A viewing is the successful DICOMweb retrievals (and the searches that name exactly that
study: the viewer's look-up of the study, its series) naming exactly one study, by the
same user from the same address (and API token, if any), with no gap longer than ``gap``
between two of them, and at least one retrieval (searches alone stay searches). Every
other record is a group of one.
Pure functions over ``Record`` (no index, no keys): the caller decides what it shows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pacsvault.audit.trail_format import Record

GAP = dt.timedelta(minutes=10)  # no access for this long: the viewing ended
VIEW = "view"  # the kind of a grouped viewing (pseudo-action of the reader's filter)
RETRIEVE = "dicomweb.retrieve"
SEARCH = "dicomweb.search"
_SEARCH_LEVELS = {"study", "series", "instance"}  # QIDO levels (qido.describe_level)
_SUCCESS = "success"


def parse_time(text: str) -> dt.datetime:
    """A record's time (ISO 8601, UTC) as an aware datetime."""
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def patients_of(refs: dict[str, Any]) -> list[str]:
    """The Patient IDs a record's (possibly cut) references name, in order."""
    out = [str(p) for p in refs.get("patient_ids", [])]
    grouped = refs.get("patients")
    if isinstance(grouped, dict):
        out += [str(p) for p in grouped if p not in out]
    return out


def viewed_study(rec: Record) -> str:
    """The study a record views, if it is part of a viewing, else ""."""
    if rec.kind != "event" or rec.outcome != _SUCCESS:
        return ""
    search = rec.action == SEARCH and rec.detail.get("level") in _SEARCH_LEVELS
    if rec.action != RETRIEVE and not search:
        return ""
    studies = rec.refs.get("study_uids", [])
    return str(studies[0]) if len(studies) == 1 else ""


@dataclass
class Group:
    """A reader's row: a viewing (``kind`` VIEW) or a single record (``kind`` "")."""

    records: list[Record]
    kind: str = ""
    study_uid: str = ""
    sops: set[str] = field(default_factory=set)
    listed: int = 0  # the most instances one study/series-level request named
    positions: list[int] = field(default_factory=list)  # of the records, in the input

    @property
    def first(self) -> Record:
        return self.records[0]

    @property
    def last(self) -> Record:
        return self.records[-1]

    @property
    def action(self) -> str:
        return VIEW if self.kind == VIEW else self.first.action

    @property
    def images(self) -> int:
        """Distinct images the viewing read (frames, rendered, instances); when it read
        none one by one (metadata only), the instances its requests covered."""
        return len(self.sops) or self.listed

    @property
    def patient_ids(self) -> list[str]:
        out: list[str] = []
        for rec in self.records:
            out += [p for p in patients_of(rec.refs) if p not in out]
        return out

    @property
    def study_uids(self) -> list[str]:
        if self.study_uid:
            return [self.study_uid]
        return [str(u) for u in self.first.refs.get("study_uids", [])]

    def add(self, rec: Record) -> None:
        self.records.append(rec)
        self.sops.update(str(u) for u in rec.refs.get("sop_uids", []))
        count = rec.detail.get("instances")
        if rec.action == RETRIEVE and isinstance(count, int):
            self.listed = max(self.listed, count)


def _viewer(rec: Record, study: str) -> tuple[str, str, str, str, str]:
    return (rec.instance, rec.actor_user, rec.actor_address, str(rec.detail.get("token", "")),
            study)


def group_records(records: Iterable[Record], gap: dt.timedelta = GAP) -> list[Group]:
    """``records`` (oldest first) as groups, ordered by their first record (oldest first).

    A viewing stays open while the same viewer reads the same study with less than
    ``gap`` between two records; other records in between (another study, a sign-in)
    do not close it, they are rows of their own.
    """
    placed: list[tuple[int, Group]] = []  # (input position of the first record, group)
    open_views: dict[tuple[str, str, str, str, str], tuple[Group, dt.datetime]] = {}
    for position, rec in enumerate(records):
        study = viewed_study(rec)
        if not study:
            placed.append((position, _single(rec)))
            continue
        key = _viewer(rec, study)
        when = parse_time(rec.time)
        current = open_views.get(key)
        if current is None or when - current[1] > gap:
            view = Group([], kind=VIEW, study_uid=study)
            placed.append((position, view))
        else:
            view = current[0]
        view.add(rec)
        view.positions.append(position)
        open_views[key] = (view, when)
    out: list[tuple[int, Group]] = []
    for position, group in placed:
        if group.kind != VIEW or any(r.action == RETRIEVE for r in group.records):
            out.append((position, group))
        else:  # searches without a retrieval: each its own row, where it was
            out += [(p, _single(r)) for p, r in zip(group.positions, group.records,
                                                     strict=True)]
    out.sort(key=lambda item: item[0])
    return [group for _position, group in out]


def _single(rec: Record) -> Group:
    single = Group([])
    single.add(rec)
    return single
