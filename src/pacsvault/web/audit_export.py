"""The audit page's exports: the filtered view as CSV or PDF, and a patient's access
report (GDPR art. 15: "who accessed my file?") as a PDF.

The CSV is streamed, built a batch of rows at a time (patients and studies resolved per
batch), so a year of trail never sits whole in memory as text; cells a spreadsheet would
run as a formula are quoted. The PDFs are ``pacsvault.documents`` documents (the same
model as the other papers a DPO hands over). Nothing here writes to disk or logs: the
caller records the export in the trail before the first byte leaves.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterator, Sequence

from pacsvault.audit.grouping import Group, parse_time
from pacsvault.audit.query import AuditSource
from pacsvault.documents import Document, Fields, Heading, Paragraph, Table
from pacsvault.web.audit_rows import Row, build_rows, local_text, zone_label
from pacsvault.web.i18n import N_, Gettext

BATCH = 200  # rows resolved and written per step of the CSV stream
PDF_ROWS = 2000  # a longer listing is cut (the CSV has it all): WeasyPrint pages cost
_FORMULA = ("=", "+", "-", "@", "\t", "\r")
CSV_HEADER = (
    N_("Start"), N_("End"), N_("Action"), N_("Action code"), N_("Outcome"), N_("User"),
    N_("DICOM device"), N_("Address"), N_("Patient ID"), N_("Patient name"),
    N_("Study Instance UID"), N_("Study"), N_("Images"), N_("Records"),
)


def _cell(value: object) -> str:
    text = str(value)
    return "'" + text if text.startswith(_FORMULA) else text


def _line(values: Sequence[object]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow([_cell(v) for v in values])
    return buffer.getvalue()


def _who_patients(row: Row) -> tuple[str, str]:
    return (" ".join(p.patient_id for p in row.patients),
            "; ".join(p.name for p in row.patients if p.name))


def csv_lines(vault: AuditSource, groups: Sequence[Group], zone: dt.tzinfo, lang: str,
              _: Gettext) -> Iterator[str]:
    """The rows of ``groups`` (newest first, as given) as CSV text, a batch at a time;
    times carry the zone's offset so the file means the same anywhere."""
    yield "\ufeff" + _line([_(h) for h in CSV_HEADER])  # BOM: spreadsheets read UTF-8
    for start in range(0, len(groups), BATCH):
        batch = groups[start:start + BATCH]
        for group, row in zip(batch, build_rows(vault, batch, zone, lang, _, raw=False),
                              strict=True):
            ids, names = _who_patients(row)
            first = parse_time(group.first.time).astimezone(zone)
            last = parse_time(group.last.time).astimezone(zone)
            yield _line([first.isoformat(timespec="seconds"),
                         last.isoformat(timespec="seconds"), row.name, row.action,
                         row.outcome, row.who if row.who != row.node else "", row.node,
                         row.address, ids, names, row.study_uid, row.study, row.images,
                         len(group.records)])


def _table(rows: Sequence[Row], _: Gettext) -> Table:
    return Table(
        (_("Time"), _("Action"), _("Who"), _("Patient"), _("Study"), _("Images"),
         _("Outcome")),
        tuple((row.start + (f" – {row.end[-8:]}" if row.end else ""), row.name,
               row.who + (f" ({row.address})" if row.address else ""),
               "; ".join(f"{p.name} ({p.patient_id})" if p.name else p.patient_id
                         for p in row.patients),
               row.study, str(row.images) if row.images else "", row.outcome)
              for row in rows))


def listing(vault: AuditSource, groups: Sequence[Group], filters: Sequence[tuple[str, str]],
            zone: dt.tzinfo, lang: str, _: Gettext, by: str) -> Document:
    """The filtered view as a document: the filters, then the rows (newest first)."""
    shown = groups[:PDF_ROWS]
    rows = build_rows(vault, shown, zone, lang, _, raw=False)
    now = local_text(dt.datetime.now(dt.UTC), zone, lang, seconds=False)
    blocks: list[Heading | Paragraph | Fields | Table] = [
        Fields(((_("Made on"), f"{now} ({zone_label(zone)})"), (_("By"), by),
                *((label, value) for label, value in filters if value))),
    ]
    if len(groups) > len(shown):
        blocks.append(Paragraph(_("The first %(shown)s of %(total)s rows; narrow the filters "
                                  "or export as CSV to get them all.")
                                % {"shown": len(shown), "total": len(groups)}))
    blocks.append(_table(rows, _) if rows else Paragraph(_("No record matches.")))
    return Document(_("Audit trail"), lang, _("Extract of the audit trail"), tuple(blocks))


def patient_report(vault: AuditSource, patient_id: str, name: str, groups: Sequence[Group],
                   zone: dt.tzinfo, lang: str, _: Gettext, by: str) -> Document:
    """Who accessed this patient's file, when and how (newest first): a summary per person
    or device, then every access. Only this patient's references are in ``groups``
    (``audit.query`` cut the others out)."""
    rows = build_rows(vault, groups, zone, lang, _, raw=False)
    per: dict[str, list[Row]] = {}
    for row in rows:
        per.setdefault(row.who, []).append(row)
    now = local_text(dt.datetime.now(dt.UTC), zone, lang, seconds=False)
    summary = Table(
        (_("Who"), _("Accesses"), _("First"), _("Last")),
        tuple((who, str(len(items)), items[-1].start, items[0].start)
              for who, items in sorted(per.items())))
    blocks: list[Heading | Paragraph | Fields | Table] = [
        Fields(((_("Patient"), name or "—"), (_("Patient ID"), patient_id),
                (_("Made on"), f"{now} ({zone_label(zone)})"), (_("By"), by))),
        Paragraph(_("Every access to this patient’s images and records kept in the audit "
                    "trail of the archive: searches, viewings, images received and sent, "
                    "exports. A viewing groups the many requests of one session on one "
                    "study.")),
        Heading(_("Who accessed the file")),
        summary if rows else Paragraph(_("No access is recorded.")),
        Heading(_("Every access")),
    ]
    if rows:
        blocks.append(_table(rows, _))
    return Document(_("Patient access report"), lang, _("GDPR article 15"), tuple(blocks))
